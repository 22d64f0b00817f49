//! `fermyon:spin/variables@2.0.0`: application variables (manifest defaults, `required`,
//! `SPIN_VARIABLE_<NAME>` from the environment) surfaced to components through the
//! templates in their `[component.<id>.variables]` tables.

use std::collections::BTreeMap;

use anyhow::{Result, bail};

use crate::bindings::fermyon::spin2_0_0::variables::{self, Error};
use crate::manifest::Manifest;
use crate::state::InstanceState;

/// Checks a variable name the way Spin 3.6.3 does (a lowercase snake_case identifier):
/// `_`-separated words, none empty, each starting with a lowercase ASCII letter and made of
/// lowercase letters and digits (`db_url2` passes; `foo_`, `foo__bar`, `foo_1`, `Db` do not).
pub fn check_name(name: &str) -> Result<()> {
    let word_ok = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_lowercase())
            && w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    if !name.split('_').all(word_ok) {
        bail!(
            "invalid variable name `{name}`: use `_`-separated words of lowercase letters and digits, each starting with a letter"
        );
    }
    Ok(())
}

/// One piece of a `{{ variable }}` template.
#[derive(Debug, PartialEq)]
enum Part<'a> {
    Literal(&'a str),
    Variable(&'a str),
}

fn parse_template(template: &str) -> Result<Vec<Part<'_>>> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Literal(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            bail!("unclosed `{{{{` in template `{template}`");
        };
        let name = after[..end].trim();
        check_name(name)?;
        parts.push(Part::Variable(name));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest));
    }
    Ok(parts)
}

/// Renders a template, looking each variable up with `lookup`.
pub fn render(template: &str, lookup: impl Fn(&str) -> Result<String>) -> Result<String> {
    let mut out = String::new();
    for part in parse_template(template)? {
        match part {
            Part::Literal(s) => out.push_str(s),
            Part::Variable(name) => out.push_str(&lookup(name)?),
        }
    }
    Ok(out)
}

/// The application's variable values, resolved once at start-up.
#[derive(Debug, Default)]
pub struct AppVariables {
    values: BTreeMap<String, String>,
}

impl AppVariables {
    /// Resolves every declared variable from `env` (`SPIN_VARIABLE_<NAME>`) or its default;
    /// a required variable with no value is an error naming how to set it.
    pub fn resolve(manifest: &Manifest, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut values = BTreeMap::new();
        for (name, decl) in &manifest.variables {
            let env_name = format!("SPIN_VARIABLE_{}", name.to_ascii_uppercase());
            let value = match (env(&env_name), &decl.default) {
                (Some(v), _) => v,
                (None, Some(default)) => default.clone(),
                (None, None) => {
                    bail!("variable `{name}` is required but has no value: set {env_name}")
                }
            };
            values.insert(name.clone(), value);
        }
        Ok(Self { values })
    }

    /// Renders a trigger setting (`address`, `channel`) against the application variables.
    pub fn render_app(&self, what: &str, template: &str) -> Result<String> {
        render(template, |var| {
            self.values.get(var).cloned().ok_or_else(|| {
                anyhow::anyhow!("{what} refers to `{var}`, which is not an application variable")
            })
        })
    }

    /// Resolves a component's `variables` table against the application variables.
    pub fn component_values(
        &self,
        component: &str,
        templates: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for (name, template) in templates {
            check_name(name)?;
            let value = render(template, |var| {
                self.values.get(var).cloned().ok_or_else(|| {
                    anyhow::anyhow!(
                        "component `{component}` variable `{name}` refers to `{var}`, which is not an application variable"
                    )
                })
            })?;
            out.insert(name.clone(), value);
        }
        Ok(out)
    }
}

impl variables::Host for InstanceState {
    async fn get(&mut self, name: String) -> Result<String, Error> {
        if check_name(&name).is_err() {
            return Err(Error::InvalidName(name));
        }
        self.component
            .variables
            .get(&name)
            .cloned()
            .ok_or_else(|| Error::Undefined(format!("no variable for {name:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_mixes_literals_and_variables() {
        let out = render(
            "postgres://{{ host }}:{{port}}/db",
            |v| Ok(v.to_uppercase()),
        )
        .unwrap();
        assert_eq!(out, "postgres://HOST:PORT/db");
    }

    #[test]
    fn an_unclosed_template_is_rejected() {
        assert!(render("x{{ host", |_| Ok(String::new())).is_err());
    }

    #[test]
    fn variable_names_follow_spin_rules() {
        assert!(check_name("db_url2").is_ok());
        for bad in ["", "Db", "2x", "a-b", "_a", "a_", "a__b", "a_1", "FOO"] {
            assert!(check_name(bad).is_err(), "{bad} should be rejected");
        }
    }
}
