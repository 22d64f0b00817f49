//! Applies `migrations/NNNN_<name>.sql` in order, each once, each in its own transaction,
//! recorded with a SHA-256 checksum. An applied file that changed is refused; concurrent
//! runs (up, down, or both) serialise on an advisory lock.
//!
//! Each migration has a down file, `NNNN_<name>.down.sql`, that undoes it; `down` runs them
//! newest first, each in its own transaction. A down file whose first line is
//! `-- irreversible` (a migration that destroys what it cannot restore) stops `down` before
//! anything is undone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The advisory-lock key all migration runs share ("sparkops" in ASCII).
const LOCK_KEY: i64 = 0x7370_6172_6b6f_7073;

/// One migration: its up file and, when there is one, its down file.
#[derive(Debug, Clone)]
pub struct Migration {
    pub version: i32,
    pub name: String,
    pub sql: String,
    pub checksum: String,
    pub down: Option<Down>,
}

/// A migration's down file.
#[derive(Debug, Clone)]
pub struct Down {
    pub sql: String,
    /// Marked `-- irreversible` on its first line: `down` refuses to pass it.
    pub irreversible: bool,
}

impl Migration {
    /// `NNNN_<name>`, as files and messages name it.
    pub fn label(&self) -> String {
        format!("{:04}_{}", self.version, self.name)
    }
}

/// Splits `NNNN_<name>` into its number and name.
fn parse_stem(file: &str, stem: &str) -> Result<(i32, String)> {
    let (number, name) = stem
        .split_once('_')
        .with_context(|| format!("migration {file}: name it NNNN_<name>.sql"))?;
    let version = number
        .parse()
        .with_context(|| format!("migration {file}: name it NNNN_<name>.sql"))?;
    Ok((version, name.to_string()))
}

/// Reads and orders the migrations in `dir`: `NNNN_<name>.sql`, numbers unique, each with
/// an optional `NNNN_<name>.down.sql`; a down file without its up file is refused.
pub fn read_dir(dir: &Path) -> Result<Vec<Migration>> {
    let mut out = Vec::new();
    let mut downs = std::collections::HashMap::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read migrations folder {}", dir.display()))?;
    for entry in entries {
        let path: PathBuf = entry?.path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        let sql = || std::fs::read_to_string(&path);
        if let Some(stem) = file.strip_suffix(".down.sql") {
            let (version, name) = parse_stem(file, stem)?;
            let sql = sql()?;
            let irreversible = sql
                .lines()
                .next()
                .is_some_and(|l| l.trim() == "-- irreversible");
            downs.insert((version, name), Down { sql, irreversible });
        } else if let Some(stem) = file.strip_suffix(".sql") {
            let (version, name) = parse_stem(file, stem)?;
            let sql = sql()?;
            let checksum = sparkops_core::ids::hex(&Sha256::digest(sql.as_bytes()));
            out.push(Migration {
                version,
                name,
                sql,
                checksum,
                down: None,
            });
        }
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
    for m in &mut out {
        m.down = downs.remove(&(m.version, m.name.clone()));
    }
    if let Some(((version, name), _)) = downs.into_iter().next() {
        bail!("{version:04}_{name}.down.sql has no {version:04}_{name}.sql to undo");
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
    locked(&mut client, async |c| apply_locked(c, &migrations).await).await
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

/// Runs `work` holding the advisory lock that every migration run (up or down) shares.
async fn locked<T>(
    client: &mut tokio_postgres::Client,
    work: impl AsyncFnOnce(&mut tokio_postgres::Client) -> Result<T>,
) -> Result<T> {
    client
        .execute("select pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = work(client).await;
    client
        .execute("select pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await?;
    result
}

/// A row of `schema_migrations`.
struct Applied {
    version: i32,
    name: String,
    checksum: String,
    applied_at: String,
}

/// What `schema_migrations` records (made when missing), by version.
async fn applied(client: &tokio_postgres::Client) -> Result<BTreeMap<i32, Applied>> {
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
            "select version, name, checksum,
                    to_char(applied_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
             from schema_migrations order by version",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let a = Applied {
                version: r.get(0),
                name: r.get(1),
                checksum: r.get(2),
                applied_at: r.get(3),
            };
            (a.version, a)
        })
        .collect())
}

async fn apply_locked(
    client: &mut tokio_postgres::Client,
    migrations: &[Migration],
) -> Result<Report> {
    let applied = applied(client).await?;
    let mut report = Report::default();
    for m in migrations {
        if let Some(a) = applied.get(&m.version) {
            if a.checksum != m.checksum {
                bail!(
                    "migration {}.sql was changed after it was applied (applied as {:04}_{}.sql); \
                     applied migrations are never edited: add a new one",
                    m.label(),
                    a.version,
                    a.name
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
        report.applied.push(m.label());
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

/// Undoes the newest `steps` applied migrations, newest first, each with its down file in
/// its own transaction, and returns their labels. Refuses before undoing anything when one
/// of them has no down file, is marked irreversible, or is not in `dir`.
pub async fn down(database_url: &str, dir: &Path, steps: usize) -> Result<Vec<String>> {
    let migrations = read_dir(dir)?;
    let mut client = connect(database_url).await?;
    locked(&mut client, async |c| {
        down_locked(c, &migrations, steps).await
    })
    .await
}

async fn down_locked(
    client: &mut tokio_postgres::Client,
    migrations: &[Migration],
    steps: usize,
) -> Result<Vec<String>> {
    let applied = applied(client).await?;
    let by_version: BTreeMap<i32, &Migration> = migrations.iter().map(|m| (m.version, m)).collect();
    let mut plan = Vec::new();
    for a in applied.values().rev().take(steps) {
        let Some(m) = by_version.get(&a.version) else {
            bail!(
                "migration {:04}_{} is applied but not in the migrations folder: nothing to undo it with",
                a.version,
                a.name
            );
        };
        match &m.down {
            None => bail!(
                "{}.sql has no down file ({}.down.sql): nothing was undone",
                m.label(),
                m.label()
            ),
            Some(d) if d.irreversible => bail!(
                "{} is marked irreversible: nothing was undone (down stops before it)",
                m.label()
            ),
            Some(d) => plan.push((m, d)),
        }
    }
    let mut undone = Vec::new();
    for (m, d) in plan {
        let tx = client.transaction().await?;
        tx.batch_execute(&d.sql)
            .await
            .map_err(|e| anyhow::anyhow!("{}.down.sql failed: {}", m.label(), db_message(&e)))?;
        tx.execute(
            "delete from schema_migrations where version = $1",
            &[&m.version],
        )
        .await?;
        tx.commit().await?;
        undone.push(m.label());
    }
    Ok(undone)
}

/// One migration's state, for `status`.
#[derive(Debug, PartialEq)]
pub struct Status {
    pub label: String,
    /// When it was applied (UTC, RFC 3339); `None` while pending.
    pub applied_at: Option<String>,
    /// Applied, but its file changed since.
    pub drifted: bool,
    /// Applied, but its file is gone from the folder.
    pub missing: bool,
    pub reversible: bool,
}

/// Every migration in `dir` and every applied one, in order: applied or pending, checksum
/// drift, missing files, whether it can be undone.
pub async fn status(database_url: &str, dir: &Path) -> Result<Vec<Status>> {
    let migrations = read_dir(dir)?;
    let client = connect(database_url).await?;
    let mut applied = applied(&client).await?;
    let mut out: Vec<(i32, Status)> = migrations
        .iter()
        .map(|m| {
            let a = applied.remove(&m.version);
            let status = Status {
                label: m.label(),
                drifted: a.as_ref().is_some_and(|a| a.checksum != m.checksum),
                applied_at: a.map(|a| a.applied_at),
                missing: false,
                reversible: m.down.as_ref().is_some_and(|d| !d.irreversible),
            };
            (m.version, status)
        })
        .collect();
    out.extend(applied.into_values().map(|a| {
        let status = Status {
            label: format!("{:04}_{}", a.version, a.name),
            applied_at: Some(a.applied_at),
            drifted: false,
            missing: true,
            reversible: false,
        };
        (a.version, status)
    }));
    out.sort_by_key(|(v, _)| *v);
    Ok(out.into_iter().map(|(_, s)| s).collect())
}
