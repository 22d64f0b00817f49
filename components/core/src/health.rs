//! Readiness: which dependencies are up, and what the answer is.

use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// The outcome of checking each dependency, in a stable order.
#[derive(Debug, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, bool)>,
}

impl Readiness {
    pub fn record(&mut self, name: &'static str, up: bool) {
        self.checks.push((name, up));
    }

    fn down(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|(_, up)| !up)
            .map(|(n, _)| *n)
            .collect()
    }

    /// `{"postgres": "up", ...}` for the response body.
    pub fn checks_json(&self) -> Value {
        let map: Map<String, Value> = self
            .checks
            .iter()
            .map(|(n, up)| (n.to_string(), json!(if *up { "up" } else { "down" })))
            .collect();
        Value::Object(map)
    }

    /// `Ok` with the body when all are up; otherwise the `503` naming what is down.
    pub fn outcome(&self) -> Result<Value, ApiError> {
        let down = self.down();
        if down.is_empty() {
            Ok(json!({"status": "ready", "checks": self.checks_json()}))
        } else {
            Err(ApiError::Unavailable(format!(
                "not ready: {} down",
                down.join(", ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_up_is_ready() {
        let mut r = Readiness::default();
        r.record("postgres", true);
        r.record("redis", true);
        assert_eq!(
            r.outcome().unwrap(),
            json!({"status": "ready", "checks": {"postgres": "up", "redis": "up"}})
        );
    }

    #[test]
    fn anything_down_is_a_503_naming_it() {
        let mut r = Readiness::default();
        r.record("postgres", true);
        r.record("key_value", false);
        r.record("redis", false);
        let err = r.outcome().unwrap_err();
        assert_eq!(err.status(), 503);
        assert_eq!(
            err,
            ApiError::Unavailable("not ready: key_value, redis down".into())
        );
    }
}
