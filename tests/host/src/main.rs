//! `sparkops`: run the app locally on the Spin-compatible host, and apply migrations.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sparkops_host::{AppOptions, RunningApp, migrate};

#[derive(Parser)]
#[command(
    name = "sparkops",
    about = "Spark-Ops control plane: local host and tools"
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
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, default_value = "migrations")]
        migrations: PathBuf,
    },
    /// Administration: `admin create-user` makes an account (and a project it owns).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Apply pending migrations.
    Migrate {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long, default_value = "migrations")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an account; the password comes from SPARKOPS_ADMIN_PASSWORD (kept out of shell history).
    CreateUser {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        #[arg(long, env = "SPARKOPS_ADMIN_PASSWORD", hide_env_values = true)]
        password: String,
        /// Also create a project with this name, owned by the new account.
        #[arg(long)]
        project: Option<String>,
    },
    /// Give an account a "Demo" project with an agent, a tool, a workflow and a schedule.
    SeedDemo {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long)]
        email: String,
    },
}

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

async fn migrate_and_report(database_url: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let report = migrate::run(database_url, dir).await?;
    for name in &report.applied {
        println!("applied migration {name}");
    }
    println!(
        "migrations: {} applied now, {} already applied",
        report.applied.len(),
        report.already
    );
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate { database_url, dir } => migrate_and_report(&database_url, &dir).await,
        Command::Admin(AdminCommand::CreateUser {
            database_url,
            email,
            name,
            password,
            project,
        }) => {
            let created = sparkops_host::admin::create_user(
                &database_url,
                &email,
                &name,
                &password,
                project.as_deref(),
            )
            .await?;
            println!("created user {}", created.user_id);
            if let Some(p) = created.project_id {
                println!("created project {p}, owned by the user");
            }
            Ok(())
        }
        Command::Admin(AdminCommand::SeedDemo {
            database_url,
            email,
        }) => {
            let demo = sparkops_host::admin::seed_demo(&database_url, &email).await?;
            let what = if demo.created {
                "created"
            } else {
                "already there:"
            };
            println!("{what} demo project {}", demo.project_id);
            Ok(())
        }
        Command::Up {
            manifest,
            runtime_config_file,
            listen,
            state_dir,
            database_url,
            migrations,
        } => {
            if let Some(url) = &database_url {
                migrate_and_report(url, &migrations).await?;
            }
            let options = AppOptions {
                manifest,
                runtime_config: runtime_config_file,
                listen,
                state_dir,
                cache_dir: None,
                env: std::env::vars().collect(),
                guest_output: true,
            };
            let app = RunningApp::start(&options).await?;
            println!("serving on http://{}", app.addr);
            tokio::signal::ctrl_c().await?;
            println!("stopping");
            app.shutdown().await;
            Ok(())
        }
    }
}
