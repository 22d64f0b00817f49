//! The end-to-end suites: the real compiled components served by the host, against a real
//! Postgres and Redis, with third parties as fakes on loopback. One test binary with a
//! module per suite, so wasmtime is linked once rather than once per suite.

#[global_allocator]
static ALLOCATOR: sparkops_host::Allocator = sparkops_host::Allocator;

mod common;

mod accounts;
mod admin;
mod agent_steps;
mod chaos;
mod conformance;
mod console;
mod contract;
mod demo;
mod deployment;
mod docs;
mod engine;
mod health;
mod hooks;
mod hostile;
mod kubernetes;
mod mcp;
mod metrics;
mod migrations;
mod projects;
mod replicas;
mod resources;
mod runs;
mod scheduler;
mod spin_smoke;
mod ssrf;
mod streaming;
mod traces;
mod triggers;
mod webhooks;
