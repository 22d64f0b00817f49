//! Outgoing plain-`http` requests over kept-alive connections, as Spin's outbound HTTP does
//! (its runtime config's `connection_pooling` is on by default): a connection whose
//! response was read to the end goes back to an idle list for its origin and carries the
//! next request there, instead of a TCP connect and close per request. `https` goes through
//! `wasmtime_wasi_http::default_send_request` (a fresh connection each time). The request's
//! connect, first-byte and between-bytes timeouts apply as they do there.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::client::conn::http1::SendRequest;
use tokio::net::TcpStream;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

/// How long an idle connection is kept: below the keep-alive timeout of common servers
/// (5 s for Node and hyper's defaults), so one is rarely reused as its server closes it.
const IDLE_FOR: Duration = Duration::from_secs(4);
/// The most idle connections kept for one origin.
const IDLE_PER_ORIGIN: usize = 32;
/// `default_send_request`'s timeout when the request sets none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

type Sender = SendRequest<WasiBody>;

/// Idle connections by origin (`host:port`).
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<String, Vec<(Sender, Instant)>>>,
}

impl Pool {
    fn take(&self, origin: &str) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(origin)?;
        while let Some((sender, since)) = list.pop() {
            if since.elapsed() < IDLE_FOR && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps `sender` for its origin once its connection can take a request again (hyper
    /// finishes reading the last response on the connection's own task).
    fn give_back(self: Arc<Self>, origin: String, mut sender: Sender) {
        tokio::spawn(async move {
            let ready = tokio::time::timeout(IDLE_FOR, sender.ready()).await;
            if !matches!(ready, Ok(Ok(()))) {
                return;
            }
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let list = idle.entry(origin).or_default();
            list.retain(|(s, since)| since.elapsed() < IDLE_FOR && !s.is_closed());
            if list.len() < IDLE_PER_ORIGIN {
                list.push((sender, Instant::now()));
            }
        });
    }

    /// Sends `request` (plain `http`) on an idle connection to its origin, or a new one.
    pub async fn send(
        self: Arc<Self>,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> Result<http::Response<WasiBody>, Error> {
        let timeout = |pick: fn(&RequestOptions) -> Option<Duration>| {
            options.as_ref().and_then(pick).unwrap_or(DEFAULT_TIMEOUT)
        };
        let connect_timeout = timeout(|o| o.connect_timeout);
        let first_byte_timeout = timeout(|o| o.first_byte_timeout);
        let between_bytes = timeout(|o| o.between_bytes_timeout).max(Duration::from_nanos(1));
        let authority = request
            .uri()
            .authority()
            .ok_or(Error::HttpRequestUriInvalid)?;
        let origin = match authority.port() {
            Some(_) => authority.to_string(),
            None => format!("{authority}:80"),
        };
        let mut sender = match self.take(&origin) {
            Some(sender) => sender,
            None => connect(&origin, connect_timeout).await?,
        };
        // The request line carries the path only (the origin is the connection's).
        *request.uri_mut() = http::Uri::builder()
            .path_and_query(
                request
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string(),
            )
            .build()
            .map_err(|_| Error::HttpRequestUriInvalid)?;
        let response = tokio::time::timeout(first_byte_timeout, sender.send_request(request))
            .await
            .map_err(|_| Error::ConnectionReadTimeout)?
            .map_err(Error::from)?;
        let pool = self.clone();
        Ok(response.map(|incoming| {
            let mut body = Returning {
                incoming,
                between_bytes,
                wait: Box::pin(tokio::time::sleep(between_bytes)),
                back: Some((pool, origin, sender)),
            };
            // An empty body is never polled: its connection is free at once.
            body.give_back_at_end();
            body.boxed_unsync()
        }))
    }
}

async fn connect(origin: &str, timeout: Duration) -> Result<Sender, Error> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(origin))
        .await
        .map_err(|_| Error::ConnectionTimeout)?
        .map_err(|_| Error::ConnectionRefused)?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = tokio::time::timeout(
        timeout,
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)?
    .map_err(Error::from)?;
    tokio::spawn(connection);
    Ok(sender)
}

/// A response body that puts its connection back in the pool once read to the end, and
/// fails when no byte comes for `between_bytes`.
struct Returning {
    incoming: hyper::body::Incoming,
    between_bytes: Duration,
    wait: Pin<Box<tokio::time::Sleep>>,
    back: Option<(Arc<Pool>, String, Sender)>,
}

impl Returning {
    /// Once the body is read to its end, its connection goes back to the pool (a reader
    /// may stop at `is_end_stream` without polling for the end).
    fn give_back_at_end(&mut self) {
        if self.incoming.is_end_stream() {
            self.give_back();
        }
    }

    /// Puts the connection back in the pool (once: later calls do nothing).
    fn give_back(&mut self) {
        if let Some((pool, origin, sender)) = self.back.take() {
            pool.give_back(origin, sender);
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Error>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(None) => {
                self.give_back();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.back = None;
                Poll::Ready(Some(Err(Error::from(e))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + self.between_bytes;
                self.wait.as_mut().reset(next);
                self.give_back_at_end();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(self.wait.as_mut().poll(cx));
                self.back = None;
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.incoming.size_hint()
    }
}
