//! The Spin application manifest (`spin.toml`, manifest version 2): the parts this host runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// A parsed `spin.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub spin_manifest_version: u32,
    pub application: Application,
    #[serde(default)]
    pub variables: BTreeMap<String, VariableDecl>,
    #[serde(default)]
    pub trigger: Triggers,
    #[serde(default)]
    pub component: BTreeMap<String, Component>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Application {
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub authors: Vec<String>,
    #[serde(default)]
    pub trigger: AppTriggers,
}

/// Application-level trigger settings (`[application.trigger.redis]`).
#[derive(Debug, Default, Deserialize)]
pub struct AppTriggers {
    #[serde(default)]
    pub redis: Option<AppRedisTrigger>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRedisTrigger {
    pub address: String,
}

/// An application variable: `default`, or `required = true`; `secret` hides it from logs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariableDecl {
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub secret: bool,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Triggers {
    #[serde(default)]
    pub http: Vec<HttpTrigger>,
    #[serde(default)]
    pub redis: Vec<RedisTrigger>,
    #[serde(default)]
    pub cron: Vec<CronTrigger>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTrigger {
    #[serde(default)]
    pub id: Option<String>,
    pub route: RouteSpec,
    pub component: String,
    #[serde(default)]
    pub executor: Option<toml::Value>,
}

/// `route = "/path/..."` or `route = { private = true }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RouteSpec {
    Path(String),
    Private { private: bool },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTrigger {
    #[serde(default)]
    pub id: Option<String>,
    pub channel: String,
    #[serde(default)]
    pub address: Option<String>,
    pub component: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CronTrigger {
    #[serde(default)]
    pub id: Option<String>,
    pub cron_expression: String,
    pub component: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    pub source: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    #[serde(default)]
    pub key_value_stores: Vec<String>,
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub files: Vec<toml::Value>,
    #[serde(default)]
    pub exclude_files: Vec<String>,
    #[serde(default)]
    pub sqlite_databases: Vec<String>,
    #[serde(default)]
    pub ai_models: Vec<String>,
    #[serde(default)]
    pub build: Option<toml::Value>,
    #[serde(default)]
    pub tool: Option<toml::Value>,
}

impl Manifest {
    /// Reads and checks a manifest; relative `source` paths resolve against its folder.
    pub fn load(path: &Path) -> Result<(Self, PathBuf)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read manifest {}", path.display()))?;
        let manifest: Manifest = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("bad manifest {}: {}", path.display(), e.message()))?;
        manifest.check()?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok((manifest, base))
    }

    fn check(&self) -> Result<()> {
        if self.spin_manifest_version != 2 {
            bail!(
                "bad manifest: spin_manifest_version must be 2, found {}",
                self.spin_manifest_version
            );
        }
        for (id, component) in &self.component {
            check_kebab_id(id).with_context(|| format!("bad manifest: component `{id}`"))?;
            for label in &component.key_value_stores {
                if check_kebab_id(label).is_err() && crate::variables::check_name(label).is_err() {
                    bail!(
                        "bad manifest: component `{id}`: key-value store label `{label}` must be kebab-case or snake_case"
                    );
                }
            }
        }
        for name in self.variables.keys() {
            crate::variables::check_name(name)
                .with_context(|| format!("bad manifest: variable `{name}`"))?;
        }
        for (name, decl) in &self.variables {
            if decl.required && decl.default.is_some() {
                bail!("bad manifest: variable `{name}` is required and has a default");
            }
            if !decl.required && decl.default.is_none() {
                bail!("bad manifest: variable `{name}` needs a default or `required = true`");
            }
        }
        let triggers = self
            .trigger
            .http
            .iter()
            .map(|t| &t.component)
            .chain(self.trigger.redis.iter().map(|t| &t.component))
            .chain(self.trigger.cron.iter().map(|t| &t.component));
        for component in triggers {
            if !self.component.contains_key(component) {
                bail!(
                    "bad manifest: a trigger names component `{component}`, which is not defined"
                );
            }
        }
        Ok(())
    }
}

impl Manifest {
    /// Keeps only `retain` and their triggers, as `spin up -c <id> ...` and the SpinKube
    /// shim's selective deployment do: every named component must exist, and a retained
    /// component may not chain to one left out.
    pub fn retain_components(&mut self, retain: &[String]) -> Result<()> {
        for id in retain {
            if !self.component.contains_key(id) {
                bail!("Specified component \"{id}\" not found in application");
            }
        }
        for id in retain {
            for rule in &self.component[id].allowed_outbound_hosts {
                let target = rule
                    .split_once("://")
                    .filter(|_| crate::outbound::is_chaining_rule(rule))
                    .and_then(|(_, host)| crate::outbound::chaining_target(host));
                let Some(target) = target else {
                    continue;
                };
                if target == "*" {
                    bail!(
                        "Component selected with '--component {id}' cannot use wildcard service chaining: allowed_outbound_hosts = [\"http://*.spin.internal\"]"
                    );
                }
                if !retain.iter().any(|r| r == target) {
                    bail!(
                        "Component selected with '--component {id}' cannot use service chaining to unselected component: allowed_outbound_hosts = [\"http://{target}.spin.internal\"]"
                    );
                }
            }
        }
        let kept = |c: &String| retain.contains(c);
        self.component.retain(|id, _| kept(id));
        self.trigger.http.retain(|t| kept(&t.component));
        self.trigger.redis.retain(|t| kept(&t.component));
        self.trigger.cron.retain(|t| kept(&t.component));
        Ok(())
    }

    /// Refuses, as SpinKube's runtime (containerd-shim-spin) does, an app with a trigger
    /// type other than http, redis, sqs, mqtt and command: here, cron.
    pub fn refuse_what_spinkube_refuses(&self) -> Result<()> {
        if !self.trigger.cron.is_empty() {
            bail!(
                "Only Http, Redis, MQTT, SQS, and Command triggers are currently supported. Found unsupported trigger: \"cron\""
            );
        }
        Ok(())
    }
}

/// Checks an identifier the way Spin 3.6.3 checks component ids (kebab-case): `-`-separated
/// words, none empty, each starting with an ASCII letter, made of letters and digits and
/// either all lowercase or all uppercase (`api-v2` and `API-v2` pass; `my_comp`, `a--b`,
/// `a-1` and `Comp` do not).
pub fn check_kebab_id(id: &str) -> Result<()> {
    if id.contains('_') {
        bail!("`{id}`: words must be separated with `-`, not `_`");
    }
    for word in id.split('-') {
        if !word.starts_with(|c: char| c.is_ascii_alphabetic()) {
            bail!("`{id}`: `-`-separated words must not be empty and must start with a letter");
        }
        let lower = word
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let upper = word
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        if !lower && !upper {
            bail!(
                "`{id}`: each `-`-separated word must be all lowercase or all uppercase letters and digits"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Manifest, check_kebab_id};

    fn manifest() -> Manifest {
        toml::from_str(
            r#"
            spin_manifest_version = 2
            [application]
            name = "x"
            [[trigger.http]]
            route = "/a"
            component = "a"
            [[trigger.http]]
            route = { private = true }
            component = "b"
            [[trigger.http]]
            route = "/c"
            component = "c"
            [component.a]
            source = "a.wasm"
            allowed_outbound_hosts = ["http://b.spin.internal:80"]
            [component.b]
            source = "b.wasm"
            [component.c]
            source = "c.wasm"
            allowed_outbound_hosts = ["http://*.spin.internal"]
            "#,
        )
        .unwrap()
    }

    #[test]
    fn retaining_keeps_the_named_components_and_refuses_chaining_to_one_left_out() {
        let err = manifest().retain_components(&["a".into()]).unwrap_err();
        assert!(
            err.to_string().contains(
                "unselected component: allowed_outbound_hosts = [\"http://b.spin.internal\"]"
            ),
            "{err}"
        );
        let err = manifest().retain_components(&["c".into()]).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot use wildcard service chaining"),
            "{err}"
        );
        let err = manifest().retain_components(&["d".into()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Specified component \"d\" not found in application"
        );

        let mut m = manifest();
        m.retain_components(&["a".into(), "b".into()]).unwrap();
        assert_eq!(m.component.keys().collect::<Vec<_>>(), ["a", "b"]);
        let routed: Vec<&str> = m
            .trigger
            .http
            .iter()
            .map(|t| t.component.as_str())
            .collect();
        assert_eq!(routed, ["a", "b"]);
    }

    #[test]
    fn component_ids_follow_spin_rules() {
        for good in ["c", "api-v2", "COMP", "A-B", "ab-C", "a-b1"] {
            assert!(check_kebab_id(good).is_ok(), "{good} should pass");
        }
        for bad in [
            "", "Comp", "my_comp", "comp-", "-a", "a--b", "a-1", "1comp", "a.b",
        ] {
            assert!(check_kebab_id(bad).is_err(), "{bad} should be rejected");
        }
    }
}
