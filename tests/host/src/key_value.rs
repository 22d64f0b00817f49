//! `fermyon:spin/key-value@2.0.0`: a component opens only the stores it lists in
//! `key_value_stores`; each label maps to Redis or to the embedded SQLite store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use redis::AsyncCommands;
use wasmtime::component::Resource;

use crate::bindings::fermyon::spin2_0_0::key_value::{self, Error};
use crate::runtime_config::KeyValueStoreConfig;
use crate::state::InstanceState;

/// A backend shared by every instance that opens the same label.
#[derive(Clone)]
pub enum Backend {
    Redis(redis::aio::ConnectionManager),
    Embedded(Arc<Embedded>),
}

/// The embedded store: one SQLite file, one table, rows keyed by store label and key.
pub struct Embedded {
    conn: Mutex<rusqlite::Connection>,
    label: String,
}

/// The guest's open store handle.
pub struct Store {
    backend: Backend,
}

impl Backend {
    /// Opens the backend for `label` (`state_dir` holds the embedded store by default).
    pub async fn open(label: &str, config: &KeyValueStoreConfig, state_dir: &Path) -> Result<Self> {
        match config {
            KeyValueStoreConfig::Redis { url } => {
                let client = redis::Client::open(url.as_str())
                    .with_context(|| format!("key-value store `{label}`: bad Redis URL"))?;
                let manager = redis::aio::ConnectionManager::new_with_config(
                    client,
                    crate::state::redis_config(),
                )
                .await
                .with_context(|| format!("key-value store `{label}`: cannot reach Redis"))?;
                Ok(Backend::Redis(manager))
            }
            KeyValueStoreConfig::Spin { path } => {
                let path = path
                    .clone()
                    .unwrap_or_else(|| state_dir.join("sqlite_key_value.db"));
                Ok(Backend::Embedded(Arc::new(Embedded::open(&path, label)?)))
            }
        }
    }
}

impl Embedded {
    fn open(path: &PathBuf, label: &str) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let conn = rusqlite::Connection::open(path)
            .with_context(|| format!("cannot open key-value file {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "create table if not exists spin_key_value (
                 store text not null, key text not null, value blob not null,
                 primary key (store, key));",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
            label: label.to_string(),
        })
    }

    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&rusqlite::Connection, &str) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, Error> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this.conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn, &this.label)
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))?
        .map_err(|e| Error::Other(e.to_string()))
    }
}

fn other(e: impl std::fmt::Display) -> Error {
    Error::Other(e.to_string())
}

impl Store {
    async fn get(&self, key: String) -> Result<Option<Vec<u8>>, Error> {
        match &self.backend {
            Backend::Redis(c) => c.clone().get(key).await.map_err(other),
            Backend::Embedded(e) => {
                e.run(move |c, store| {
                    use rusqlite::OptionalExtension;
                    c.query_row(
                        "select value from spin_key_value where store = ?1 and key = ?2",
                        (store, &key),
                        |r| r.get(0),
                    )
                    .optional()
                })
                .await
            }
        }
    }

    async fn set(&self, key: String, value: Vec<u8>) -> Result<(), Error> {
        match &self.backend {
            Backend::Redis(c) => c.clone().set(key, value).await.map_err(other),
            Backend::Embedded(e) => {
                e.run(move |c, store| {
                    c.execute(
                        "insert into spin_key_value (store, key, value) values (?1, ?2, ?3)
                         on conflict (store, key) do update set value = excluded.value",
                        (store, &key, &value),
                    )
                    .map(drop)
                })
                .await
            }
        }
    }

    async fn delete(&self, key: String) -> Result<(), Error> {
        match &self.backend {
            Backend::Redis(c) => c.clone().del(key).await.map_err(other),
            Backend::Embedded(e) => {
                e.run(move |c, store| {
                    c.execute(
                        "delete from spin_key_value where store = ?1 and key = ?2",
                        (store, &key),
                    )
                    .map(drop)
                })
                .await
            }
        }
    }

    async fn exists(&self, key: String) -> Result<bool, Error> {
        match &self.backend {
            Backend::Redis(c) => c.clone().exists(key).await.map_err(other),
            Backend::Embedded(_) => Ok(self.get(key).await?.is_some()),
        }
    }

    async fn get_keys(&self) -> Result<Vec<String>, Error> {
        match &self.backend {
            Backend::Redis(c) => c.clone().keys("*").await.map_err(other),
            Backend::Embedded(e) => {
                e.run(|c, store| {
                    let mut stmt = c.prepare("select key from spin_key_value where store = ?1")?;
                    stmt.query_map([store], |r| r.get(0))?.collect()
                })
                .await
            }
        }
    }
}

impl key_value::Host for InstanceState {}

impl key_value::HostStore for InstanceState {
    async fn open(&mut self, label: String) -> Result<Resource<Store>, Error> {
        if !self.component.key_value_stores.contains(&label) {
            return Err(Error::AccessDenied);
        }
        let backend = self
            .app
            .key_value
            .get(&label)
            .cloned()
            .ok_or(Error::NoSuchStore)?;
        self.table.push(Store { backend }).map_err(other)
    }

    async fn get(&mut self, store: Resource<Store>, key: String) -> Result<Option<Vec<u8>>, Error> {
        self.table.get(&store).map_err(other)?.get(key).await
    }

    async fn set(
        &mut self,
        store: Resource<Store>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), Error> {
        self.table.get(&store).map_err(other)?.set(key, value).await
    }

    async fn delete(&mut self, store: Resource<Store>, key: String) -> Result<(), Error> {
        self.table.get(&store).map_err(other)?.delete(key).await
    }

    async fn exists(&mut self, store: Resource<Store>, key: String) -> Result<bool, Error> {
        self.table.get(&store).map_err(other)?.exists(key).await
    }

    async fn get_keys(&mut self, store: Resource<Store>) -> Result<Vec<String>, Error> {
        self.table.get(&store).map_err(other)?.get_keys().await
    }

    async fn drop(&mut self, store: Resource<Store>) -> wasmtime::Result<()> {
        self.table.delete(store)?;
        Ok(())
    }
}
