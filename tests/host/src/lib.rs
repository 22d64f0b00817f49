//! A Spin-compatible host on wasmtime, faithful to Spin 3.x for the interfaces the app
//! uses: it reads the real `spin.toml` and Spin's runtime-config format and runs the compiled
//! components, so the project can run and be tested where the `spin` CLI cannot be installed.

pub mod app;
pub mod http_pool;
pub mod key_value;
pub mod manifest;
pub mod outbound;
pub mod outbound_http;
pub mod postgres;
pub mod redis_client;
pub mod router;
pub mod runtime_config;
pub mod state;
pub mod triggers;
pub mod variables;

/// Host bindings of the WIT that ships in the `spin-sdk` crate (see `build.rs`).
#[allow(clippy::all)]
pub mod bindings {
    include!(concat!(env!("OUT_DIR"), "/spin_bindings.rs"));
}

pub use app::{AppInner, AppOptions, RunningApp};

/// The allocator of the processes that run the host (`sparkops`, the end-to-end suites, the
/// benchmark), each naming it as its `#[global_allocator]`. Every request allocates and
/// frees many small buffers on the host's side (the statements' parameters and rows, HTTP
/// heads, the guests' lowered strings); glibc's allocator took about a tenth of the host's
/// CPU under the engine's benchmark, mimalloc about two thirds of that (README, "The run
/// engine").
pub use mimalloc::MiMalloc as Allocator;
