//! Outgoing HTTP from a component: denied with `HttpRequestDenied` unless its
//! `allowed_outbound_hosts` allows the URL; from an HTTP-triggered instance
//! `http://<component>.spin.internal` chains to another component in-process (Spin's local
//! service chaining), `http://self` to the app's own router; other hosts pass the runtime
//! config's `block_networks` check first, and plain `http` goes over kept-alive connections
//! ([`crate::http_pool`]).

use std::sync::Arc;

use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::outbound::BlockedNetworks;
use crate::state::{AppShared, ComponentRuntime};

pub struct OutboundHttp {
    component: Arc<ComponentRuntime>,
    app: Arc<AppShared>,
    network: Arc<BlockedNetworks>,
    /// Spin chains only from HTTP-triggered instances; from a Redis or cron instance a
    /// `*.spin.internal` URL (allowed by a wildcard) goes to the network and fails there.
    chaining: bool,
}

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

/// Where an allowed request goes.
enum Target {
    Component(String),
    SelfApp,
    Network,
}

impl OutboundHttp {
    pub fn new(
        component: Arc<ComponentRuntime>,
        app: Arc<AppShared>,
        network: Arc<BlockedNetworks>,
        chaining: bool,
    ) -> Self {
        Self {
            component,
            app,
            network,
            chaining,
        }
    }

    /// The runtime config's blocked networks, which apply to outbound Redis too.
    pub fn network(&self) -> &BlockedNetworks {
        &self.network
    }

    fn target(&self, uri: &http::Uri) -> Result<Target, Error> {
        let scheme = uri.scheme_str().unwrap_or("http");
        let host = uri.host().unwrap_or_default().to_ascii_lowercase();
        if !self
            .component
            .allowed_hosts
            .allows(scheme, &host, uri.port_u16())
        {
            eprintln!(
                "component `{}` tried to make an HTTP request to non-allowed host `{host}`",
                self.component.id
            );
            return Err(Error::HttpRequestDenied);
        }
        if let Some(id) = crate::outbound::chaining_target(&host)
            && self.chaining
        {
            return Ok(Target::Component(id.to_string()));
        }
        if (host == "self" || host == "self.alt") && self.chaining {
            return Ok(Target::SelfApp);
        }
        Ok(Target::Network)
    }
}

/// Refuses a request any of whose resolved addresses is blocked (stricter than Spin, which
/// drops the blocked ones and connects to the rest: the sender here resolves again, so it
/// could pick a blocked one).
async fn check_blocked(network: &BlockedNetworks, uri: &http::Uri) -> Result<(), Error> {
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let (blocked, _) = network
        .blocked_addresses(
            uri.host().unwrap_or_default(),
            uri.port_u16().unwrap_or(default_port),
        )
        .await
        .map_err(|_| Error::DestinationNotFound)?;
    if blocked.is_empty() {
        Ok(())
    } else {
        Err(Error::DestinationIpProhibited)
    }
}

fn done() -> Box<dyn Future<Output = Result<(), Error>> + Send> {
    Box::new(async { Ok(()) })
}

impl WasiHttpHooks for OutboundHttp {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> ResponseFuture {
        drop(fut);
        let lost = self
            .app
            .faults
            .drop_dispatches
            .load(std::sync::atomic::Ordering::Relaxed)
            && request.headers().contains_key("x-sparkops-dispatch");
        if lost {
            return Box::new(async { Err(Error::ConnectionRefused) });
        }
        let target = self.target(request.uri());
        let app = self.app.clone();
        let network = self.network.clone();
        Box::new(async move {
            let local = match target? {
                Target::Network => {
                    check_blocked(&network, request.uri()).await?;
                    if request.uri().scheme_str() == Some("http") {
                        let response = app.http.clone().send(request, options).await?;
                        return Ok((response, done()));
                    }
                    let (res, io) =
                        wasmtime_wasi_http::default_send_request(request, options).await?;
                    return Ok((
                        res.map(BodyExt::boxed_unsync),
                        Box::new(io) as Box<dyn Future<Output = _> + Send>,
                    ));
                }
                Target::Component(id) => Some(id),
                Target::SelfApp => None,
            };
            let app = app
                .app
                .get()
                .and_then(std::sync::Weak::upgrade)
                .ok_or(Error::DestinationUnavailable)?;
            let response = match local {
                Some(id) => app.chain(&id, request).await?,
                None => app.route_internal(request).await,
            };
            let response = response.map(|body| {
                body.map_err(|code| Error::InternalError(Some(format!("{code:?}"))))
                    .boxed_unsync()
            });
            Ok((response, done()))
        })
    }
}
