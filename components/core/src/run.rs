//! The run state machine (API.md "Runs", DESIGN.md section 5) as plain functions: which
//! pending steps become ready or are skipped, when a run is finished and how, and when a
//! failed attempt is tried again.
//!
//! The rules, documented once here:
//! - A step waits until every dependency is finished. A dependency that *failed* or was
//!   *cancelled* fails the run (fail fast; steps not yet started are cancelled).
//! - When every dependency succeeded or was skipped: if all of them were skipped (and it
//!   has any), the step is skipped too (a branch not taken stays not taken); otherwise its
//!   `when`, if any, decides: false skips it, true makes it ready. So a join after two
//!   `when` branches runs after whichever branch ran.
//! - A run succeeds when every step succeeded or was skipped.

use std::collections::HashMap;

use serde_json::Value;

use crate::status::ErrorKind;
pub use crate::status::StepStatus;
use crate::template::Scope;
use crate::workflow::{Definition, RetryPolicy};

/// What to do with a pending step now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Ready,
    /// Skipped, with the reason recorded on the step.
    Skip(String),
}

/// The scope templates and `when` read: the run input and succeeded steps' outputs.
pub struct RunScope<'a> {
    pub input: &'a Value,
    pub outputs: &'a HashMap<String, Value>,
}

impl Scope for RunScope<'_> {
    fn input(&self) -> &Value {
        self.input
    }

    fn output(&self, step: &str) -> Option<&Value> {
        self.outputs.get(step)
    }
}

/// Decisions for the pending steps whose dependencies are all finished without failure.
/// A step whose `when` does not parse cannot run (validation keeps that from happening)
/// and is skipped with the parser's message.
pub fn decide(
    definition: &Definition,
    statuses: &HashMap<String, StepStatus>,
    scope: &RunScope<'_>,
) -> Vec<(String, Decision)> {
    let mut out = Vec::new();
    for step in &definition.steps {
        if statuses.get(&step.key) != Some(&StepStatus::Pending) {
            continue;
        }
        let deps: Vec<StepStatus> = step
            .depends_on
            .iter()
            .map(|d| statuses.get(d).copied().unwrap_or(StepStatus::Pending))
            .collect();
        let settled = deps
            .iter()
            .all(|s| matches!(s, StepStatus::Succeeded | StepStatus::Skipped));
        if !settled {
            continue;
        }
        if !deps.is_empty() && deps.iter().all(|s| *s == StepStatus::Skipped) {
            out.push((
                step.key.clone(),
                Decision::Skip("every dependency was skipped".into()),
            ));
            continue;
        }
        let decision = match &step.when {
            None => Decision::Ready,
            Some(when) => match crate::expr::parse(when) {
                Ok(e) if e.eval(scope) => Decision::Ready,
                Ok(_) => Decision::Skip(format!("`{when}` is false")),
                Err(m) => Decision::Skip(format!("`{when}` does not parse: {m}")),
            },
        };
        out.push((step.key.clone(), decision));
    }
    out
}

/// How a run ends, judged from its steps' statuses; `None` while work remains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// A step failed (or was cancelled): the run fails, and steps not started are cancelled.
    Failed,
}

pub fn outcome(statuses: &HashMap<String, StepStatus>) -> Option<Outcome> {
    if statuses
        .values()
        .any(|s| matches!(s, StepStatus::Failed | StepStatus::Cancelled))
    {
        return Some(Outcome::Failed);
    }
    statuses
        .values()
        .all(|s| matches!(s, StepStatus::Succeeded | StepStatus::Skipped))
        .then_some(Outcome::Succeeded)
}

/// The wait before attempt `attempt + 1` after attempt `attempt` (1-based) failed with
/// `kind`: `None` when the policy says no more attempts. Exponential from
/// `initial_interval_ms` by `backoff_coefficient`, capped at `max_interval_ms`, then
/// jittered down by up to 20% (`jitter` in 0..=1 from the caller's randomness) so retries
/// of many runs do not arrive together.
pub fn retry_delay_ms(
    policy: &RetryPolicy,
    attempt: u32,
    kind: ErrorKind,
    jitter: f64,
) -> Option<u64> {
    if attempt >= policy.max_attempts || policy.non_retryable.contains(&kind) {
        return None;
    }
    let exponent = attempt.saturating_sub(1).min(64) as i32;
    let raw = policy.initial_interval_ms as f64 * policy.backoff_coefficient.powi(exponent);
    let capped = raw.min(policy.max_interval_ms as f64);
    let jittered = capped * (1.0 - 0.2 * jitter.clamp(0.0, 1.0));
    Some(jittered.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::{Step, StepKind};
    use serde_json::json;

    fn step(key: &str, deps: &[&str], when: Option<&str>) -> Step {
        Step {
            key: key.into(),
            kind: StepKind::Condition,
            agent_id: None,
            tool_id: None,
            input: json!({}),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            when: when.map(str::to_string),
            retry: RetryPolicy::default(),
            timeout_ms: None,
            approval: None,
        }
    }

    fn statuses(pairs: &[(&str, StepStatus)]) -> HashMap<String, StepStatus> {
        pairs.iter().map(|(k, s)| (k.to_string(), *s)).collect()
    }

    use StepStatus::*;

    #[test]
    fn roots_are_ready_and_dependants_wait_for_every_dependency() {
        let def = Definition {
            steps: vec![
                step("a", &[], None),
                step("b", &[], None),
                step("c", &["a", "b"], None),
            ],
        };
        let outputs = HashMap::new();
        let scope = RunScope {
            input: &json!({}),
            outputs: &outputs,
        };
        let got = decide(
            &def,
            &statuses(&[("a", Pending), ("b", Pending), ("c", Pending)]),
            &scope,
        );
        assert_eq!(
            got,
            [
                ("a".to_string(), Decision::Ready),
                ("b".to_string(), Decision::Ready)
            ]
        );
        let got = decide(
            &def,
            &statuses(&[("a", Succeeded), ("b", Running), ("c", Pending)]),
            &scope,
        );
        assert!(got.is_empty());
        let got = decide(
            &def,
            &statuses(&[("a", Succeeded), ("b", Succeeded), ("c", Pending)]),
            &scope,
        );
        assert_eq!(got, [("c".to_string(), Decision::Ready)]);
    }

    #[test]
    fn when_picks_a_branch_and_the_join_runs_after_the_branch_taken() {
        let def = Definition {
            steps: vec![
                step("check", &[], None),
                step("yes", &["check"], Some("steps.check.output.ok == true")),
                step("no", &["check"], Some("steps.check.output.ok == false")),
                step("join", &["yes", "no"], None),
                step("after_no", &["no"], None),
            ],
        };
        let outputs = HashMap::from([("check".to_string(), json!({"ok": true}))]);
        let scope = RunScope {
            input: &json!({}),
            outputs: &outputs,
        };
        let s = statuses(&[
            ("check", Succeeded),
            ("yes", Pending),
            ("no", Pending),
            ("join", Pending),
            ("after_no", Pending),
        ]);
        assert_eq!(
            decide(&def, &s, &scope),
            [
                ("yes".to_string(), Decision::Ready),
                (
                    "no".to_string(),
                    Decision::Skip("`steps.check.output.ok == false` is false".into())
                ),
            ]
        );
        let s = statuses(&[
            ("check", Succeeded),
            ("yes", Succeeded),
            ("no", Skipped),
            ("join", Pending),
            ("after_no", Pending),
        ]);
        assert_eq!(
            decide(&def, &s, &scope),
            [
                ("join".to_string(), Decision::Ready),
                (
                    "after_no".to_string(),
                    Decision::Skip("every dependency was skipped".into())
                ),
            ]
        );
    }

    #[test]
    fn a_run_ends_when_every_step_is_final_and_fails_fast() {
        assert_eq!(
            outcome(&statuses(&[("a", Succeeded), ("b", Skipped)])),
            Some(Outcome::Succeeded)
        );
        assert_eq!(
            outcome(&statuses(&[("a", Succeeded), ("b", Running)])),
            None
        );
        assert_eq!(
            outcome(&statuses(&[("a", Failed), ("b", Running)])),
            Some(Outcome::Failed)
        );
        assert_eq!(outcome(&statuses(&[("a", Waiting)])), None);
    }

    #[test]
    fn retries_back_off_exponentially_with_a_cap_and_jitter() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_interval_ms: 1000,
            backoff_coefficient: 2.0,
            max_interval_ms: 5000,
            non_retryable: vec![ErrorKind::Validation],
        };
        let delays: Vec<Option<u64>> = (1..=5)
            .map(|a| retry_delay_ms(&p, a, ErrorKind::Timeout, 0.0))
            .collect();
        assert_eq!(
            delays,
            [Some(1000), Some(2000), Some(4000), Some(5000), None]
        );
        assert_eq!(retry_delay_ms(&p, 2, ErrorKind::Timeout, 1.0), Some(1600));
        assert_eq!(retry_delay_ms(&p, 1, ErrorKind::Validation, 0.0), None);
    }
}
