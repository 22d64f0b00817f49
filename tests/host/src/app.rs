//! Loading a Spin app (manifest, runtime config, compiled components) and serving its HTTP
//! trigger: a fresh instance per request, the response sent as soon as the guest sets it,
//! and the guest left running after it, as Spin does.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Body;
use tokio::net::TcpListener;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store,
};
use wasmtime_wasi::cli::OutputFile;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::bindings::Platform;
use crate::key_value::Backend;
use crate::manifest::{Manifest, RouteSpec};
use crate::outbound::{AllowedHosts, BlockedNetworks};
use crate::router::{Route, Router};
use crate::runtime_config::RuntimeConfig;
use crate::state::{AppShared, ComponentRuntime, InstanceState};
use crate::triggers::{
    Activity, CronError, CronMetadata, CronSchedule, RedisError, RedisSubscription, TriggerExports,
};
use crate::variables::{self, AppVariables};
use wasmtime::component::ComponentExportIndex;

/// How to start an app.
#[derive(Debug, Clone)]
pub struct AppOptions {
    pub manifest: PathBuf,
    pub runtime_config: Option<PathBuf>,
    pub listen: SocketAddr,
    /// Holds the embedded key-value store (`.spin` under `spin up`).
    pub state_dir: PathBuf,
    /// Compiled components, reused across starts; `<state_dir>/compiled` when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Where `SPIN_VARIABLE_*` values come from; the process environment by default.
    pub env: HashMap<String, String>,
    /// Pass the guests' stdout and stderr through (their log lines); off keeps tests quiet.
    pub guest_output: bool,
    /// Serve only these components and their triggers (`spin up -c`); all when empty.
    pub components: Vec<String>,
    /// Refuse what SpinKube's runtime refuses (a cron trigger), as a deployment there would.
    pub like_spinkube: bool,
}

/// Instances that may exist at once (requests in flight plus guests running on after
/// their response).
const MAX_CONCURRENT_INSTANCES: u32 = 512;
/// The most of a pooled memory or table kept mapped (and reset in place) when its instance
/// ends; what an instance wrote beyond it is returned to the kernel.
const KEEP_RESIDENT: usize = 16 << 20;

struct Loaded {
    runtime: Arc<ComponentRuntime>,
    pre: wasmtime::component::InstancePre<InstanceState>,
    http: Option<ProxyPre<InstanceState>>,
    exports: TriggerExports,
}

pub struct AppInner {
    engine: Engine,
    components: HashMap<String, Loaded>,
    router: Router,
    shared: Arc<AppShared>,
    network: Arc<BlockedNetworks>,
    local_addr: OnceLock<SocketAddr>,
    guest_output: bool,
    redis: Vec<RedisSubscription>,
    cron: Vec<CronSchedule>,
    /// Trigger handlers in flight, for [`RunningApp::wait_idle`].
    pub activity: Arc<Activity>,
    /// Why a trigger stopped for good (a Redis subscription lost), once one has.
    trigger_failure: OnceLock<String>,
    trigger_failed: tokio::sync::Notify,
}

/// A running app; dropping it (or calling [`RunningApp::shutdown`]) stops accepting requests.
pub struct RunningApp {
    pub addr: SocketAddr,
    pub inner: Arc<AppInner>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    /// The Redis and cron trigger loops, ended with the app.
    triggers: Vec<tokio::task::JoinHandle<()>>,
}

/// Whether `perf` should name the guests' functions: wasmtime then writes
/// /tmp/perf-<pid>.map, and components are compiled in memory rather than read from the
/// cache, whose file mappings `perf` would read instead (used in the README's engine
/// measurements).
fn perfmap_requested() -> bool {
    std::env::var_os("SPARKOPS_HOST_PERFMAP").is_some()
}

fn new_engine() -> Result<Engine> {
    // Where the kernel has `PAGEMAP_SCAN` (Linux 6.7+), a pooled slot's pages stay mapped
    // between instances and only the pages the last instance wrote are reset in place
    // (copied back from the image or zeroed), instead of `madvise` returning every page and
    // the next instance faulting them in again. Without it, keeping memory resident would
    // mean resetting all of it every time, so the pool keeps the default (`madvise`).
    engine_config(true)
        .and_then(|config| Engine::new(&config))
        .or_else(|_| engine_config(false).and_then(|config| Engine::new(&config)))
        .map_err(|e| anyhow::anyhow!("cannot start wasmtime: {e}"))
}

fn engine_config(keep_resident: bool) -> wasmtime::Result<Config> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    // Spin 3.x gives guests WASI 0.2, whose calls are synchronous to the guest: no store
    // needs the component-model-async task bookkeeping on every host call.
    config.concurrency_support(false);
    if perfmap_requested() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(MAX_CONCURRENT_INSTANCES)
        .total_core_instances(MAX_CONCURRENT_INSTANCES * 4)
        .total_memories(MAX_CONCURRENT_INSTANCES * 2)
        .total_tables(MAX_CONCURRENT_INSTANCES * 2)
        .total_stacks(MAX_CONCURRENT_INSTANCES)
        .max_memory_size(crate::state::MAX_INSTANCE_MEMORY);
    if keep_resident {
        pool.pagemap_scan(Enabled::Yes)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT);
    }
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Ok(config)
}

/// Why a connection was closed without an answer.
#[derive(Debug)]
struct RefusedChainingHost;

impl std::fmt::Display for RefusedChainingHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an inbound request named a service-chaining host")
    }
}

impl std::error::Error for RefusedChainingHost {}

/// Whether the request's `Host` is `<id>.spin.internal` (with or without a port).
fn names_chaining_host<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(crate::outbound::chaining_target)
        .is_some()
}

/// Spin's loader marks the whole app as needing local service chaining when any component
/// names a `*.spin.internal` host, and only the HTTP trigger supports that: the Redis and
/// cron triggers refuse such an app at start-up (`ensure_needs_only`), with this message.
fn refuse_unsupported_chaining(manifest: &Manifest) -> Result<()> {
    let chaining = manifest.component.values().any(|c| {
        c.allowed_outbound_hosts
            .iter()
            .any(|h| crate::outbound::is_chaining_rule(h))
    });
    let refusing = [
        ("cron", !manifest.trigger.cron.is_empty()),
        ("redis", !manifest.trigger.redis.is_empty()),
    ];
    if let Some((trigger, _)) = refusing.iter().find(|(_, present)| chaining && *present) {
        bail!(
            "This application requires the following features that are not available in this version of the '{trigger}' trigger: local_service_chaining"
        );
    }
    Ok(())
}

/// A component compiled by this engine, from `cache_dir` when these exact bytes were compiled
/// before by a compatible engine (same wasmtime, settings and CPU features), so a restart or
/// a test's fresh app skips Cranelift. The file is written whole and renamed into place, so
/// a concurrent start never reads half of one; an unreadable file is compiled again. Files
/// are named after the source (`<stem>-<sha256>-<engine>.cwasm`), and writing one removes
/// the older builds of the same source, so the folder holds one build per source.
fn compile_cached(
    engine: &Engine,
    bytes: &[u8],
    cache_dir: &Path,
    source: &Path,
) -> Result<Component> {
    use sha2::{Digest, Sha256};
    use std::hash::{Hash, Hasher};

    let mut compat = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let digest = Sha256::digest(bytes);
    let key = sparkops_core::ids::hex(&digest);
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = format!("{stem}-{key}-{:016x}.cwasm", compat.finish());
    let path = cache_dir.join(&name);
    if perfmap_requested() {
        return Ok(Component::new(engine, bytes)?);
    }
    if path.is_file() {
        // SAFETY: the file is one this host wrote with `Component::serialize` for an engine
        // with the same compatibility hash, in the host's own state folder; wasmtime
        // checks its header and refuses anything from another version or configuration.
        #[allow(unsafe_code)]
        let cached = unsafe { Component::deserialize_file(engine, &path) };
        if let Ok(component) = cached {
            return Ok(component);
        }
    }
    let component = Component::new(engine, bytes)?;
    if std::fs::create_dir_all(cache_dir).is_ok() {
        let tmp = path.with_extension(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
        let written = component
            .serialize()
            .ok()
            .and_then(|compiled| std::fs::write(&tmp, compiled).ok());
        if written.is_some() && std::fs::rename(&tmp, &path).is_ok() {
            let older = std::fs::read_dir(cache_dir).into_iter().flatten().flatten();
            for entry in older {
                let file = entry.file_name().to_string_lossy().into_owned();
                let same_source = file.strip_prefix(&stem).is_some_and(|rest| {
                    // `<stem>-<64 hex>-<16 hex>.cwasm`, so `a` never matches `a_b-...`.
                    rest.len() == 1 + 64 + 1 + 16 + 6 && rest.starts_with('-')
                });
                if same_source && file != name && file.ends_with(".cwasm") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
    Ok(component)
}

fn empty(status: StatusCode) -> Response<HyperOutgoingBody> {
    let body = Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut res = Response::new(body);
    *res.status_mut() = status;
    res
}

impl AppInner {
    /// Builds the app: every start-up problem is one error with one clear line.
    pub async fn load(options: &AppOptions) -> Result<Arc<Self>> {
        let (mut manifest, base) = Manifest::load(&options.manifest)?;
        if !options.components.is_empty() {
            manifest.retain_components(&options.components)?;
        }
        if options.like_spinkube {
            manifest.refuse_what_spinkube_refuses()?;
        }
        let runtime_config = match &options.runtime_config {
            Some(p) => RuntimeConfig::load(p)?,
            None => RuntimeConfig::default(),
        };
        refuse_unsupported_chaining(&manifest)?;
        let app_vars = AppVariables::resolve(&manifest, |k| options.env.get(k).cloned())?;
        std::fs::create_dir_all(&options.state_dir).with_context(|| {
            format!("cannot create state folder {}", options.state_dir.display())
        })?;
        let cache_dir = options
            .cache_dir
            .clone()
            .unwrap_or_else(|| options.state_dir.join("compiled"));
        let engine = new_engine()?;

        let mut linker: Linker<InstanceState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        Platform::add_to_linker::<_, wasmtime::component::HasSelf<InstanceState>>(
            &mut linker,
            |s| s,
        )?;

        let http_components: BTreeSet<&str> = manifest
            .trigger
            .http
            .iter()
            .map(|t| t.component.as_str())
            .collect();
        let mut labels = BTreeSet::new();
        let mut components = HashMap::new();
        for (id, c) in &manifest.component {
            let variables = app_vars.component_values(id, &c.variables)?;
            let rules = c
                .allowed_outbound_hosts
                .iter()
                .map(|t| {
                    variables::render(t, |v| {
                        variables.get(v).cloned().with_context(|| {
                            format!("allowed_outbound_hosts of `{id}` uses `{v}`, which is not a variable of the component")
                        })
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let allowed_hosts =
                AllowedHosts::parse(&rules).with_context(|| format!("component `{id}`"))?;
            labels.extend(c.key_value_stores.iter().cloned());
            let source = base.join(&c.source);
            let bytes = std::fs::read(&source).with_context(|| {
                format!(
                    "component `{id}`: cannot read {} (build the components first)",
                    source.display()
                )
            })?;
            let component = compile_cached(&engine, &bytes, &cache_dir, &source).map_err(|e| {
                anyhow::anyhow!(
                    "component `{id}`: {} is not a valid component: {e}",
                    source.display()
                )
            })?;
            let pre = linker
                .instantiate_pre(&component)
                .map_err(|e| anyhow::anyhow!("component `{id}` cannot be linked: {e}"))?;
            let exports = TriggerExports::find(&component);
            let http = if http_components.contains(id.as_str()) {
                Some(ProxyPre::new(pre.clone()).map_err(|e| {
                    anyhow::anyhow!("component `{id}` has an HTTP trigger but does not export wasi:http/incoming-handler: {e}")
                })?)
            } else {
                None
            };
            let runtime = Arc::new(ComponentRuntime {
                id: id.clone(),
                variables,
                environment: c.environment.clone(),
                allowed_hosts,
                key_value_stores: c.key_value_stores.iter().cloned().collect(),
                source,
                logs: if options.guest_output {
                    None
                } else {
                    Some(log_files(&options.state_dir, id)?)
                },
            });
            components.insert(
                id.clone(),
                Loaded {
                    runtime,
                    pre,
                    http,
                    exports,
                },
            );
        }
        let (redis, cron) = load_triggers(&manifest, &app_vars, &components)?;

        let mut key_value = HashMap::new();
        for label in labels {
            let config = runtime_config.store_for(&label)?;
            key_value.insert(
                label.clone(),
                Backend::open(&label, &config, &options.state_dir).await?,
            );
        }

        let mut routes = Vec::new();
        for t in &manifest.trigger.http {
            match &t.route {
                RouteSpec::Path(p) => routes.push(
                    Route::parse(p, &t.component)
                        .with_context(|| format!("bad manifest: component `{}`", t.component))?,
                ),
                RouteSpec::Private { private: true } => {}
                RouteSpec::Private { private: false } => {
                    bail!(
                        "bad manifest: component `{}`: route = {{ private = false }} is not a route",
                        t.component
                    )
                }
            }
        }
        let router = Router::new(routes).context("bad manifest")?;
        let network = Arc::new(BlockedNetworks::parse(
            &runtime_config.outbound_networking.block_networks,
        )?);
        let shared = Arc::new(AppShared {
            key_value,
            postgres: Default::default(),
            redis: Default::default(),
            app: OnceLock::new(),
            faults: Default::default(),
            http: Default::default(),
        });
        let app = Arc::new(Self {
            engine,
            components,
            router,
            shared,
            network,
            local_addr: OnceLock::new(),
            guest_output: options.guest_output,
            redis,
            cron,
            activity: Default::default(),
            trigger_failure: OnceLock::new(),
            trigger_failed: tokio::sync::Notify::new(),
        });
        app.shared.app.set(Arc::downgrade(&app)).ok();
        Ok(app)
    }

    /// Serves the HTTP trigger on `listen` until the returned app is shut down.
    pub async fn serve(self: Arc<Self>, listen: SocketAddr) -> Result<RunningApp> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        self.local_addr.set(addr).ok();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let app = self.clone();
        let server = tokio::spawn(async move {
            loop {
                let (stream, client) = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            eprintln!("accept failed: {e}");
                            continue;
                        }
                    },
                };
                let app = app.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let app = app.clone();
                        async move {
                            // Spin (3.6.3, checked) answers a request whose `Host` names a
                            // service-chaining host with no response at all: the
                            // connection is closed.
                            if names_chaining_host(&req) {
                                return Err(RefusedChainingHost);
                            }
                            Ok(app.handle_external(req, client).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let triggers = self.start_triggers().await?;
        Ok(RunningApp {
            addr,
            inner: self,
            stop: Some(stop),
            server,
            triggers,
        })
    }

    async fn handle_external<B>(
        &self,
        req: Request<B>,
        client: SocketAddr,
    ) -> Response<HyperOutgoingBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| self.local_addr.get().map(|a| a.to_string()))
            .unwrap_or_else(|| "localhost".into());
        self.route(req, &host, client).await
    }

    /// Routes by path (`self` requests and external ones); unmatched paths are `404` with
    /// an empty body and no component is called.
    async fn route<B>(
        &self,
        req: Request<B>,
        host: &str,
        client: SocketAddr,
    ) -> Response<HyperOutgoingBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let path = req.uri().path().to_string();
        let Some(m) = self.router.route(&path) else {
            return empty(StatusCode::NOT_FOUND);
        };
        let mut headers = vec![
            ("spin-matched-route", m.raw_route.to_string()),
            ("spin-raw-component-route", m.raw_route.to_string()),
            ("spin-component-route", m.component_route.clone()),
            ("spin-path-info", m.path_info.clone()),
        ];
        let params: Vec<(String, String)> = m
            .params
            .iter()
            .map(|(k, v)| (format!("spin-path-match-{k}"), v.clone()))
            .collect();
        let component = m.component.to_string();
        headers.push(("spin-base-path", "/".into()));
        headers.push(("spin-client-addr", client.to_string()));
        self.invoke(&component, req, host, headers, params).await
    }

    /// Local service chaining: `http://<id>.spin.internal/...` reaches component `id`
    /// directly, private routes included.
    pub async fn chain(
        &self,
        id: &str,
        req: Request<wasmtime_wasi_http::WasiBody>,
    ) -> Result<Response<HyperOutgoingBody>, wasmtime_wasi_http::Error> {
        if self.components.get(id).is_none_or(|c| c.http.is_none()) {
            return Err(wasmtime_wasi_http::Error::DestinationNotFound);
        }
        let path = req.uri().path().to_string();
        let host = format!("{id}.spin.internal");
        let headers = vec![
            ("spin-matched-route", "/...".to_string()),
            ("spin-raw-component-route", "/...".to_string()),
            ("spin-component-route", String::new()),
            ("spin-path-info", path),
            ("spin-base-path", "/".into()),
            ("spin-client-addr", "127.0.0.1:0".into()),
        ];
        Ok(self.invoke(id, req, &host, headers, vec![]).await)
    }

    /// `http://self/...`: the app's own routes, without leaving the process.
    pub async fn route_internal(
        &self,
        req: Request<wasmtime_wasi_http::WasiBody>,
    ) -> Response<HyperOutgoingBody> {
        let host = self
            .local_addr
            .get()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "self".into());
        self.route(req, &host, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
    }

    async fn invoke<B>(
        &self,
        id: &str,
        req: Request<B>,
        host: &str,
        spin_headers: Vec<(&'static str, String)>,
        params: Vec<(String, String)>,
    ) -> Response<HyperOutgoingBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let Some(Loaded {
            runtime,
            http: Some(pre),
            ..
        }) = self.components.get(id)
        else {
            return empty(StatusCode::NOT_FOUND);
        };
        let (mut parts, body) = req.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let full_url = format!("http://{host}{path_and_query}");
        parts.uri = match full_url.parse() {
            Ok(u) => u,
            Err(_) => return empty(StatusCode::BAD_REQUEST),
        };
        // Spin hands components no `Host` header: they read `spin-full-url`.
        parts.headers.remove(http::header::HOST);
        let extra = spin_headers
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain(std::iter::once(("spin-full-url".to_string(), full_url)))
            .chain(params);
        for (k, v) in extra {
            if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(k), HeaderValue::try_from(v))
            {
                parts.headers.insert(name, value);
            }
        }
        let req = Request::from_parts(parts, body);

        let mut store = self.new_store(runtime, true);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let prepared = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)
            .and_then(|req| Ok((req, store.data_mut().http().new_response_outparam(tx)?)));
        let (req, out) = match prepared {
            Ok(p) => p,
            Err(e) => {
                eprintln!("component `{id}`: cannot prepare request: {e}");
                return empty(StatusCode::INTERNAL_SERVER_ERROR);
            }
        };
        let pre = pre.clone();
        let component = id.to_string();
        // The guest runs in its own task so it can go on after it has set the response.
        let task = tokio::spawn(async move {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out)
                .await
        });
        match rx.await {
            Ok(Ok(res)) => {
                let component = component.clone();
                tokio::spawn(async move {
                    if let Ok(Err(e)) = task.await {
                        eprintln!("component `{component}` failed after responding: {e:?}");
                    }
                });
                res
            }
            Ok(Err(code)) => {
                eprintln!("component `{component}` answered with an error: {code:?}");
                empty(StatusCode::INTERNAL_SERVER_ERROR)
            }
            Err(_) => {
                match task.await {
                    Ok(Ok(())) => {
                        eprintln!("component `{component}` returned without setting a response")
                    }
                    Ok(Err(e)) => eprintln!("component `{component}` trapped: {e:?}"),
                    Err(e) => eprintln!("component `{component}` task failed: {e}"),
                }
                empty(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    /// A store for one instance; `http_triggered` instances may chain to other components
    /// (Spin installs its chaining interceptor only in the HTTP trigger).
    fn new_store(
        &self,
        runtime: &Arc<ComponentRuntime>,
        http_triggered: bool,
    ) -> Store<InstanceState> {
        let mut store = Store::new(
            &self.engine,
            InstanceState::new(
                runtime.clone(),
                self.shared.clone(),
                self.network.clone(),
                self.guest_output,
                http_triggered,
            ),
        );
        store.limiter(|s| s.limiter());
        store
    }

    /// A fresh instance of `id` for one trigger event, with the export `pick` chooses.
    async fn trigger_instance(
        &self,
        id: &str,
        pick: impl Fn(&TriggerExports) -> Option<&ComponentExportIndex>,
    ) -> Result<(
        Store<InstanceState>,
        wasmtime::component::Instance,
        ComponentExportIndex,
    )> {
        let loaded = self
            .components
            .get(id)
            .with_context(|| format!("no component `{id}`"))?;
        let export = pick(&loaded.exports)
            .cloned()
            .with_context(|| format!("component `{id}` does not export this trigger's handler"))?;
        let mut store = self.new_store(&loaded.runtime, false);
        let instance = loaded.pre.instantiate_async(&mut store).await?;
        Ok((store, instance, export))
    }

    /// Handles one Redis message with a fresh instance of `id`.
    pub async fn handle_redis(&self, id: &str, payload: Vec<u8>) -> Result<()> {
        let (mut store, instance, export) = self.trigger_instance(id, |e| e.redis.as_ref()).await?;
        let func = instance
            .get_typed_func::<(Vec<u8>,), (Result<(), RedisError>,)>(&mut store, &export)?;
        let (result,) = func.call_async(&mut store, (payload,)).await?;
        result.map_err(|e| anyhow::anyhow!("the handler answered {e:?}"))
    }

    /// Fires `id`'s cron handler once, as at Unix time `timestamp` (tests choose "now").
    pub async fn handle_cron(&self, id: &str, timestamp: u64) -> Result<()> {
        let (mut store, instance, export) = self.trigger_instance(id, |e| e.cron.as_ref()).await?;
        let func = instance
            .get_typed_func::<(CronMetadata,), (Result<(), CronError>,)>(&mut store, &export)?;
        let (result,) = func
            .call_async(&mut store, (CronMetadata { timestamp },))
            .await?;
        result.map_err(|CronError::Other(e)| anyhow::anyhow!("the handler answered: {e}"))
    }

    /// Subscribes every Redis trigger (waiting until each address is subscribed, so a
    /// message published after start-up is never missed) and starts the cron tickers.
    async fn start_triggers(self: &Arc<Self>) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut tasks = Vec::new();
        let mut by_address: Vec<(String, Vec<RedisSubscription>)> = Vec::new();
        for sub in &self.redis {
            match by_address.iter_mut().find(|(a, _)| *a == sub.address) {
                Some((_, subs)) => subs.push(sub.clone()),
                None => by_address.push((sub.address.clone(), vec![sub.clone()])),
            }
        }
        for (address, subs) in by_address {
            let (ready, subscribed) = tokio::sync::oneshot::channel();
            tasks.push(tokio::spawn(crate::triggers::run_redis(
                self.clone(),
                address,
                subs,
                ready,
            )));
            subscribed
                .await
                .context("the Redis trigger stopped before subscribing")??;
        }
        for schedule in &self.cron {
            tasks.push(tokio::spawn(crate::triggers::run_cron(
                Arc::downgrade(self),
                schedule.clone(),
            )));
        }
        Ok(tasks)
    }

    /// Records that a trigger stopped for good, as Spin's trigger ends `spin up` with an
    /// error when its Redis subscription is lost (crates/trigger-redis: the listener returns
    /// "disconnected from ..." and the trigger's `run` returns it; Spin does not reconnect,
    /// its supervisor restarts it).
    pub fn trigger_stopped(&self, why: String) {
        let _ = self.trigger_failure.set(why);
        self.trigger_failed.notify_waiters();
    }

    /// The failures tests can switch on.
    pub fn faults(&self) -> &crate::state::Faults {
        &self.shared.faults
    }

    /// A component's resolved settings (for tests and start-up messages).
    pub fn component(&self, id: &str) -> Option<&ComponentRuntime> {
        self.components.get(id).map(|c| c.runtime.as_ref())
    }
}

impl RunningApp {
    /// Starts an app: load, then serve.
    pub async fn start(options: &AppOptions) -> Result<Self> {
        AppInner::load(options).await?.serve(options.listen).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until no trigger handler has run for a moment (the orchestrator is idle),
    /// for at most `limit`; `false` when it was still busy then.
    pub async fn wait_idle(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut quiet = 0;
        let mut last = self.inner.activity.handled();
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let handled = self.inner.activity.handled();
            if self.inner.activity.busy() == 0 && handled == last {
                quiet += 1;
                if quiet >= 5 {
                    return true;
                }
            } else {
                quiet = 0;
                last = handled;
            }
        }
        false
    }

    /// Stops accepting connections and waits for the accept loop to end.
    /// Waits until a trigger has stopped for good; why. `sparkops up` then exits with it,
    /// as `spin up` does.
    pub async fn trigger_failure(&self) -> String {
        loop {
            let notified = self.inner.trigger_failed.notified();
            if let Some(why) = self.inner.trigger_failure.get() {
                return why.clone();
            }
            notified.await;
        }
    }

    pub async fn shutdown(mut self) {
        for t in &self.triggers {
            t.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
    }
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        for t in &self.triggers {
            t.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The append-only stdout and stderr files of component `id`, as `spin up` keeps them.
fn log_files(state_dir: &std::path::Path, id: &str) -> Result<(OutputFile, OutputFile)> {
    let dir = state_dir.join("logs");
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the log folder {}", dir.display()))?;
    let open = |stream: &str| -> Result<OutputFile> {
        let path = dir.join(format!("{id}_{stream}.txt"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(OutputFile::new(file))
    };
    Ok((open("stdout")?, open("stderr")?))
}

/// The Redis subscriptions and cron schedules of the manifest, checked: every address and
/// channel rendered, every expression parsed, every component exporting its handler.
fn load_triggers(
    manifest: &Manifest,
    vars: &AppVariables,
    components: &HashMap<String, Loaded>,
) -> Result<(Vec<RedisSubscription>, Vec<CronSchedule>)> {
    let exports = |id: &str| {
        components
            .get(id)
            .map(|c| c.exports.clone())
            .unwrap_or_default()
    };
    let mut redis = Vec::new();
    for t in &manifest.trigger.redis {
        let address = t
            .address
            .as_ref()
            .or(manifest.application.trigger.redis.as_ref().map(|r| &r.address))
            .with_context(|| {
                format!(
                    "bad manifest: the Redis trigger of `{}` has no address and [application.trigger.redis] sets none",
                    t.component
                )
            })?;
        let what = format!("the Redis trigger of `{}`", t.component);
        if exports(&t.component).redis.is_none() {
            bail!(
                "component `{}` has a Redis trigger but does not export fermyon:spin/inbound-redis",
                t.component
            );
        }
        redis.push(RedisSubscription {
            address: vars.render_app(&what, address)?,
            channel: vars.render_app(&what, &t.channel)?,
            component: t.component.clone(),
        });
    }
    let mut cron = Vec::new();
    for t in &manifest.trigger.cron {
        if exports(&t.component).cron.is_none() {
            bail!(
                "component `{}` has a cron trigger but does not export handle-cron-event",
                t.component
            );
        }
        cron.push(CronSchedule::parse(&t.component, &t.cron_expression)?);
    }
    Ok((redis, cron))
}
