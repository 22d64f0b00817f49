//! Spin's runtime-config file (`--runtime-config-file`): key-value stores and outbound
//! networking. Sections this host does not implement are refused rather than ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    #[serde(default)]
    pub key_value_store: BTreeMap<String, KeyValueStoreConfig>,
    #[serde(default)]
    pub outbound_networking: OutboundNetworking,
}

/// `[key_value_store.<label>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyValueStoreConfig {
    /// Spin's embedded store; `path` is relative to the runtime-config file.
    Spin {
        #[serde(default)]
        path: Option<PathBuf>,
    },
    Redis {
        url: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundNetworking {
    #[serde(default)]
    pub block_networks: Vec<String>,
}

impl RuntimeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read runtime config {}", path.display()))?;
        let mut config: RuntimeConfig = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("bad runtime config {}: {}", path.display(), e.message())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for store in config.key_value_store.values_mut() {
            if let KeyValueStoreConfig::Spin { path: Some(p) } = store
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// The store a label maps to: configured, or for `default` the embedded store.
    pub fn store_for(&self, label: &str) -> Result<KeyValueStoreConfig> {
        match self.key_value_store.get(label) {
            Some(c) => Ok(c.clone()),
            None if label == "default" => Ok(KeyValueStoreConfig::Spin { path: None }),
            None => bail!(
                "key-value store `{label}` is used by a component but not defined in the runtime config"
            ),
        }
    }
}
