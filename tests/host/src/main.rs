//! `sparkops`: run the app locally on the Spin-compatible host (migrations and accounts are
//! the operator's tool's, `sparkops-ops`; `up` applies pending migrations first).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sparkops_host::{AppOptions, RunningApp};
use sparkops_ops::migrate;

#[derive(Parser)]
#[command(
    name = "sparkops",
    about = "Spark-Ops control plane on the Spin-compatible host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the app from spin.toml (applies migrations first when a database URL is given).
    Up {
        #[arg(long, default_value = "spin.toml")]
        manifest: PathBuf,
        #[arg(long)]
        runtime_config_file: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: SocketAddr,
        #[arg(long, default_value = ".spin")]
        state_dir: PathBuf,
        /// Where compiled components are kept between starts (default: `compiled` in the
        /// state folder); processes may share one.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, default_value = "migrations")]
        migrations: PathBuf,
        /// Serve only this component and its triggers (repeatable), as `spin up -c`.
        #[arg(long = "component-id", short = 'c')]
        components: Vec<String>,
        /// Refuse what SpinKube's runtime refuses (trigger types other than http and redis
        /// here), to check a deployment's component set before it ships.
        #[arg(long)]
        like_spinkube: bool,
    },
}

#[global_allocator]
static ALLOCATOR: sparkops_host::Allocator = sparkops_host::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up {
            manifest,
            runtime_config_file,
            listen,
            state_dir,
            cache_dir,
            database_url,
            migrations,
            components,
            like_spinkube,
        } => {
            if let Some(url) = &database_url {
                migrate::run_and_report(url, &migrations).await?;
            }
            let options = AppOptions {
                manifest,
                runtime_config: runtime_config_file,
                listen,
                state_dir,
                cache_dir,
                env: std::env::vars().collect(),
                guest_output: true,
                components,
                like_spinkube,
            };
            let app = RunningApp::start(&options).await?;
            println!("serving on http://{}", app.addr);
            // Like `spin up`: Ctrl-C stops the app; a trigger that stops for good (a lost
            // Redis subscription) ends it with the error, for a supervisor to restart it.
            tokio::select! {
                stopped = tokio::signal::ctrl_c() => {
                    stopped?;
                    println!("stopping");
                    app.shutdown().await;
                    Ok(())
                }
                why = app.trigger_failure() => {
                    app.shutdown().await;
                    Err(anyhow::anyhow!("{why}"))
                }
            }
        }
    }
}
