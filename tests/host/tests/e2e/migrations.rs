//! The migration runner against a real Postgres.

use crate::common::{TestEnv, connect};
use sparkops_ops::migrate;

fn dir_with(files: &[(&str, &str)]) -> tempdir::Dir {
    let dir = tempdir::Dir::new();
    for (name, sql) in files {
        std::fs::write(dir.path().join(name), sql).unwrap();
    }
    dir
}

mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let p = std::env::temp_dir()
                .join(format!("sparkops-mig-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn empty_database() -> (TestEnv, String) {
    // TestEnv migrates its database; make a second, empty one beside it.
    let env = TestEnv::new().await;
    let name = format!("{}_empty", env.database_name);
    env.db()
        .await
        .batch_execute(&format!("create database {name}"))
        .await
        .unwrap();
    let mut url = url::Url::parse(&env.database_url).unwrap();
    url.set_path(&name);
    (env, url.to_string())
}

async fn versions(url: &str) -> Vec<i32> {
    connect(url)
        .await
        .query(
            "select version from schema_migrations order by version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn migrations_apply_in_order_once() {
    let (_env, url) = empty_database().await;
    let dir = dir_with(&[
        (
            "0002_b.sql",
            "create table b (a_id int references a (a_id));",
        ),
        ("0001_a.sql", "create table a (a_id int primary key);"),
    ]);
    let first = migrate::run(&url, dir.path()).await.unwrap();
    assert_eq!(first.applied, ["0001_a", "0002_b"]);
    let again = migrate::run(&url, dir.path()).await.unwrap();
    assert_eq!((again.applied.len(), again.already), (0, 2));
    assert_eq!(versions(&url).await, [1, 2]);
}

#[tokio::test]
async fn a_changed_applied_migration_is_refused() {
    let (_env, url) = empty_database().await;
    let dir = dir_with(&[("0001_a.sql", "create table a (x int);")]);
    migrate::run(&url, dir.path()).await.unwrap();
    std::fs::write(dir.path().join("0001_a.sql"), "create table a (x bigint);").unwrap();
    let err = migrate::run(&url, dir.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0001_a.sql was changed after it was applied"),
        "{err}"
    );
}

#[tokio::test]
async fn a_failing_migration_changes_nothing_and_stops_the_run() {
    let (_env, url) = empty_database().await;
    let dir = dir_with(&[
        ("0001_a.sql", "create table a (x int);"),
        (
            "0002_bad.sql",
            "create table half (x int); insert into nowhere values (1);",
        ),
        ("0003_c.sql", "create table c (x int);"),
    ]);
    let err = migrate::run(&url, dir.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0002_bad.sql failed") && err.contains("42P01"),
        "{err}"
    );
    assert_eq!(versions(&url).await, [1]);
    let half: i64 = connect(&url)
        .await
        .query_one(
            "select count(*) from information_schema.tables where table_name in ('half', 'c')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(half, 0);
}

#[tokio::test]
async fn concurrent_runs_apply_each_migration_exactly_once() {
    let (_env, url) = empty_database().await;
    let dir = dir_with(&[
        ("0001_a.sql", "create table a (x int);"),
        ("0002_b.sql", "create table b (x int);"),
    ]);
    let path = dir.path().to_path_buf();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let (url, path) = (url.clone(), path.clone());
            tokio::spawn(async move { migrate::run(&url, &path).await.unwrap() })
        })
        .collect();
    let mut applied = 0;
    for r in runs {
        applied += r.await.unwrap().applied.len();
    }
    assert_eq!(applied, 2);
    assert_eq!(versions(&url).await, [1, 2]);
}

#[tokio::test]
async fn badly_named_files_are_refused() {
    let dir = dir_with(&[("first.sql", "select 1;")]);
    let err = migrate::read_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("NNNN_<name>.sql"), "{err}");
    let dup = dir_with(&[("0001_a.sql", ""), ("0001_b.sql", "")]);
    assert!(
        migrate::read_dir(dup.path())
            .unwrap_err()
            .to_string()
            .contains("share number 0001")
    );
}

#[tokio::test]
async fn the_projects_migrations_apply_cleanly() {
    let (_env, url) = empty_database().await;
    let report = migrate::run(&url, &crate::common::workspace().join("migrations"))
        .await
        .unwrap();
    assert!(!report.applied.is_empty());
}

#[tokio::test]
async fn an_unreachable_database_is_one_clear_line_without_the_password() {
    let dir = dir_with(&[("0001_a.sql", "select 1;")]);
    // Port 9 (discard) on loopback: nothing listens there.
    let err = migrate::run("postgres://u:hunter2@127.0.0.1:9/db", dir.path())
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.starts_with("cannot connect to Postgres (postgres://u:***@127.0.0.1:9/db)"),
        "{msg}"
    );
    assert!(!msg.contains("hunter2") && !msg.contains('\n'), "{msg}");
}
