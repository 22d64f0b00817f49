//! `sparkops-ops`: the operator's tool. `migrate` applies the migrations (the deployment's
//! migration Job runs it before the app rolls); `admin` manages accounts.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sparkops_ops::{admin, migrate};

#[derive(Parser)]
#[command(
    name = "sparkops-ops",
    about = "Spark-Ops operator's tool: migrations and administration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations (`up`, the default), undo the newest N (`down [N]`, 1 by
    /// default), or list every migration's state (`status`).
    Migrate {
        #[command(subcommand)]
        action: Option<MigrateAction>,
        #[arg(long, env = "DATABASE_URL", global = true)]
        database_url: Option<String>,
        #[arg(long, default_value = "migrations", global = true)]
        dir: PathBuf,
    },
    /// Administration: `admin create-user` makes an account (and a project it owns).
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Subcommand)]
enum MigrateAction {
    /// Apply what is pending, in order.
    Up,
    /// Undo the newest applied migrations, newest first; refused before anything is undone
    /// when one of them is irreversible or has no down file.
    Down {
        #[arg(default_value_t = 1)]
        steps: usize,
    },
    /// Applied or pending, checksum drift, files missing, reversibility.
    Status,
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate {
            action,
            database_url,
            dir,
        } => {
            let database_url =
                database_url.context("set --database-url or DATABASE_URL for the database")?;
            match action.unwrap_or(MigrateAction::Up) {
                MigrateAction::Up => migrate::run_and_report(&database_url, &dir).await,
                MigrateAction::Down { steps } => {
                    for label in migrate::down(&database_url, &dir, steps).await? {
                        println!("undid migration {label}");
                    }
                    Ok(())
                }
                MigrateAction::Status => {
                    for s in migrate::status(&database_url, &dir).await? {
                        let state = match (&s.applied_at, s.missing, s.drifted) {
                            (_, true, _) => "applied, file missing".to_string(),
                            (Some(at), _, true) => format!("applied {at}, file changed since"),
                            (Some(at), _, false) => format!("applied {at}"),
                            (None, _, _) => "pending".to_string(),
                        };
                        let undo = if s.reversible { "" } else { " (irreversible)" };
                        println!("{}  {state}{undo}", s.label);
                    }
                    Ok(())
                }
            }
        }
        Command::Admin(AdminCommand::CreateUser {
            database_url,
            email,
            name,
            password,
            project,
        }) => {
            let created =
                admin::create_user(&database_url, &email, &name, &password, project.as_deref())
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
            let demo = admin::seed_demo(&database_url, &email).await?;
            let what = if demo.created {
                "created"
            } else {
                "already there:"
            };
            println!("{what} demo project {}", demo.project_id);
            Ok(())
        }
    }
}
