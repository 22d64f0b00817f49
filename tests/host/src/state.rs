//! Per-instance store data and the per-component and per-app state it points at.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::OutputFile;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::app::AppInner;
use crate::key_value::Backend;
use crate::outbound::AllowedHosts;
use crate::outbound_http::OutboundHttp;

/// What the host knows about one component, fixed at start-up.
pub struct ComponentRuntime {
    pub id: String,
    pub variables: BTreeMap<String, String>,
    pub environment: BTreeMap<String, String>,
    pub allowed_hosts: AllowedHosts,
    pub key_value_stores: BTreeSet<String>,
    pub source: PathBuf,
    /// Where the guest's stdout and stderr go when they are not shown: as `spin up` does,
    /// `<state>/logs/<component>_stdout.txt` and `_stderr.txt`, appended.
    pub logs: Option<(OutputFile, OutputFile)>,
}

/// Shared by every instance of the app.
pub struct AppShared {
    pub key_value: HashMap<String, Backend>,
    pub postgres: crate::postgres::Pools,
    /// Outbound Redis connections by address; they reconnect by themselves after a failure.
    pub redis: tokio::sync::Mutex<HashMap<String, redis::aio::ConnectionManager>>,
    /// Set once the app is built, so outbound calls can chain to other components.
    pub app: OnceLock<Weak<AppInner>>,
    pub faults: Faults,
    /// Kept-alive connections for outgoing plain-`http` requests.
    pub http: Arc<crate::http_pool::Pool>,
}

/// Failures a test can switch on, to show the app survives them.
#[derive(Default)]
pub struct Faults {
    /// Redis `PUBLISH` from guests succeeds and reaches no subscriber: every message lost,
    /// as Redis pub/sub (at most once) can lose them.
    pub drop_redis_publishes: std::sync::atomic::AtomicBool,
    /// The cron schedules skip their ticks (as if no periodic replica were running); a
    /// test still fires a component itself with `handle_cron`.
    pub pause_cron: std::sync::atomic::AtomicBool,
    /// Outgoing requests that carry a step dispatch (`x-sparkops-dispatch`) fail as a refused
    /// connection: the executor's host died before it accepted the step.
    pub drop_dispatches: std::sync::atomic::AtomicBool,
}

impl AppShared {
    pub async fn redis_connection(
        &self,
        address: &str,
    ) -> Result<redis::aio::ConnectionManager, crate::bindings::fermyon::spin2_0_0::redis::Error>
    {
        use crate::bindings::fermyon::spin2_0_0::redis::Error;
        let mut conns = self.redis.lock().await;
        if let Some(c) = conns.get(address) {
            return Ok(c.clone());
        }
        let client = redis::Client::open(address).map_err(|_| Error::InvalidAddress)?;
        let conn = redis::aio::ConnectionManager::new_with_config(client, redis_config())
            .await
            .map_err(|e| Error::Other(e.to_string()))?;
        conns.insert(address.to_string(), conn.clone());
        Ok(conn)
    }
}

/// The `T` of every `Store<T>`: one per invocation.
pub struct InstanceState {
    pub component: Arc<ComponentRuntime>,
    pub app: Arc<AppShared>,
    pub table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: OutboundHttp,
    limits: StoreLimits,
}

/// Memory one instance may grow to (also the pooling allocator's bound per memory).
pub(crate) const MAX_INSTANCE_MEMORY: usize = 256 << 20;

impl InstanceState {
    pub fn new(
        component: Arc<ComponentRuntime>,
        app: Arc<AppShared>,
        network: Arc<crate::outbound::BlockedNetworks>,
        guest_output: bool,
        http_triggered: bool,
    ) -> Self {
        let mut wasi = WasiCtx::builder();
        if guest_output {
            wasi.inherit_stdout().inherit_stderr();
        } else if let Some((stdout, stderr)) = &component.logs {
            wasi.stdout(stdout.clone()).stderr(stderr.clone());
        }
        for (k, v) in &component.environment {
            wasi.env(k, v);
        }
        Self {
            hooks: OutboundHttp::new(component.clone(), app.clone(), network, http_triggered),
            component,
            app,
            table: ResourceTable::new(),
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(MAX_INSTANCE_MEMORY)
                .instances(16)
                .build(),
        }
    }

    /// The runtime config's `block_networks`.
    pub fn blocked_networks(&self) -> &crate::outbound::BlockedNetworks {
        self.hooks.network()
    }

    pub fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InstanceState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Outbound Redis (key-value, rate limits, pub/sub) gives up after a bound instead of
/// waiting for ever on a server that accepted and went silent: a guest's call fails and
/// its request answers (a 503, a logged warning) rather than hang.
pub fn redis_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(std::time::Duration::from_secs(2))
        .set_response_timeout(std::time::Duration::from_secs(2))
}
