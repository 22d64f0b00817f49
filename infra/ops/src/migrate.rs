//! Applies `migrations/NNNN_<name>.sql` in order, each once, each in its own transaction,
//! recorded with a SHA-256 checksum. An applied file that changed is refused; concurrent
//! runs serialise on an advisory lock.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The advisory-lock key all migration runs share ("sparkops" in ASCII).
const LOCK_KEY: i64 = 0x7370_6172_6b6f_7073;

/// One migration file.
#[derive(Debug, Clone)]
pub struct Migration {
    pub version: i32,
    pub name: String,
    pub sql: String,
    pub checksum: String,
}

/// Reads and orders the migrations in `dir`; names must be `NNNN_<name>.sql`, numbers unique.
pub fn read_dir(dir: &Path) -> Result<Vec<Migration>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read migrations folder {}", dir.display()))?;
    for entry in entries {
        let path: PathBuf = entry?.path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        let Some(stem) = file.strip_suffix(".sql") else {
            continue;
        };
        let (number, name) = stem
            .split_once('_')
            .with_context(|| format!("migration {file}: name it NNNN_<name>.sql"))?;
        let version: i32 = number
            .parse()
            .with_context(|| format!("migration {file}: name it NNNN_<name>.sql"))?;
        let sql = std::fs::read_to_string(&path)?;
        let checksum = sparkops_core::ids::hex(&Sha256::digest(sql.as_bytes()));
        out.push(Migration {
            version,
            name: name.to_string(),
            sql,
            checksum,
        });
    }
    out.sort_by_key(|m| m.version);
    if let Some(w) = out.windows(2).find(|w| w[0].version == w[1].version) {
        bail!(
            "two migrations share number {:04}: {} and {}",
            w[0].version,
            w[0].name,
            w[1].name
        );
    }
    Ok(out)
}

/// What a run did.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub applied: Vec<String>,
    pub already: usize,
}

/// Connects to `database_url` and applies what is pending.
pub async fn run(database_url: &str, dir: &Path) -> Result<Report> {
    let migrations = read_dir(dir)?;
    let mut client = connect(database_url).await?;
    apply(&mut client, &migrations).await
}

/// A client for `database_url` (its connection driven by a task); an unreachable database
/// is one line that names the URL without its password.
pub async fn connect(database_url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot connect to Postgres ({}): {e}", redact(database_url))
        })?;
    tokio::spawn(connection);
    Ok(client)
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

async fn apply(client: &mut tokio_postgres::Client, migrations: &[Migration]) -> Result<Report> {
    client
        .execute("select pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply_locked(client, migrations).await;
    client
        .execute("select pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await?;
    result
}

async fn apply_locked(
    client: &mut tokio_postgres::Client,
    migrations: &[Migration],
) -> Result<Report> {
    client
        .batch_execute(
            "create table if not exists schema_migrations (
                 version integer primary key,
                 name text not null,
                 checksum text not null,
                 applied_at timestamptz not null default now())",
        )
        .await?;
    let rows = client
        .query(
            "select version, name, checksum from schema_migrations order by version",
            &[],
        )
        .await?;
    let applied: std::collections::HashMap<i32, (String, String)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut report = Report::default();
    for m in migrations {
        if let Some((name, checksum)) = applied.get(&m.version) {
            if *checksum != m.checksum {
                bail!(
                    "migration {:04}_{}.sql was changed after it was applied (applied as {:04}_{name}.sql); \
                     applied migrations are never edited: add a new one",
                    m.version,
                    m.name,
                    m.version
                );
            }
            report.already += 1;
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(&m.sql).await.map_err(|e| {
            anyhow::anyhow!(
                "migration {:04}_{}.sql failed: {}",
                m.version,
                m.name,
                db_message(&e)
            )
        })?;
        tx.execute(
            "insert into schema_migrations (version, name, checksum) values ($1, $2, $3)",
            &[&m.version, &m.name, &m.checksum],
        )
        .await?;
        tx.commit().await?;
        report.applied.push(format!("{:04}_{}", m.version, m.name));
    }
    Ok(report)
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Applies pending migrations and prints what it did, a line per migration applied.
pub async fn run_and_report(database_url: &str, dir: &Path) -> Result<()> {
    let report = run(database_url, dir).await?;
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
