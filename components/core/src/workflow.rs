//! Workflow definitions (API.md "Workflows"): a DAG of steps, checked whole. Every problem is
//! reported with its path (`steps[2].depends_on[0]`): unknown fields, bad keys, duplicate
//! keys, unknown dependencies, cycles (with the cycle's path), agents and tools not of the
//! project, templates that read a step that is not an ancestor, and retry, timeout and
//! approval bounds.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use crate::error::{ApiError, FieldError};
pub use crate::status::ErrorKind;
use crate::template::{self, Source};

pub const MAX_STEPS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Agent,
    Tool,
    Condition,
    Approval,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Tool => "tool",
            Self::Condition => "condition",
            Self::Approval => "approval",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "agent" => Self::Agent,
            "tool" => Self::Tool,
            "condition" => Self::Condition,
            "approval" => Self::Approval,
            _ => return None,
        })
    }
}

/// Per-step retries: exponential backoff from `initial_interval_ms`, capped.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_interval_ms: u64,
    pub backoff_coefficient: f64,
    pub max_interval_ms: u64,
    pub non_retryable: Vec<ErrorKind>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_interval_ms: 1_000,
            backoff_coefficient: 2.0,
            max_interval_ms: 60_000,
            non_retryable: vec![ErrorKind::PolicyViolation, ErrorKind::Validation],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Approval {
    pub timeout_s: u64,
    /// Who may decide (user ids); anyone who may write to the project when empty.
    pub approvers: Vec<String>,
    /// How many distinct approvals pass the step; one rejection fails it.
    pub quorum: u32,
}

impl Default for Approval {
    fn default() -> Self {
        Approval {
            // A day's wait when the definition sets none.
            timeout_s: 86_400,
            approvers: Vec::new(),
            quorum: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub key: String,
    pub kind: StepKind,
    pub agent_id: Option<String>,
    pub tool_id: Option<String>,
    pub input: Value,
    pub depends_on: Vec<String>,
    pub when: Option<String>,
    pub retry: RetryPolicy,
    pub timeout_ms: Option<u64>,
    pub approval: Option<Approval>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub steps: Vec<Step>,
}

/// The agents and tools of the workflow's project.
#[derive(Debug, Default)]
pub struct Catalog {
    pub agents: HashSet<String>,
    pub tools: HashSet<String>,
}

/// Collects errors with their paths.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

fn valid_key(k: &str) -> bool {
    let mut chars = k.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && k.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

const STEP_FIELDS: [&str; 10] = [
    "key",
    "kind",
    "agent_id",
    "tool_id",
    "input",
    "depends_on",
    "when",
    "retry",
    "timeout_ms",
    "approval",
];

fn uint(v: &Value, path: &str, min: u64, max: u64, errors: &mut Errors) -> Option<u64> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Some(n),
        _ => {
            errors.add(path, format!("must be an integer from {min} to {max}"));
            None
        }
    }
}

fn parse_retry(v: &Value, path: &str, errors: &mut Errors) -> RetryPolicy {
    let mut retry = RetryPolicy::default();
    let Some(obj) = v.as_object() else {
        errors.add(path, "must be an object");
        return retry;
    };
    for (k, val) in obj {
        let p = format!("{path}.{k}");
        match k.as_str() {
            "max_attempts" => retry.max_attempts = uint(val, &p, 1, 20, errors).unwrap_or(1) as u32,
            "initial_interval_ms" => {
                retry.initial_interval_ms = uint(val, &p, 1, 3_600_000, errors).unwrap_or(1)
            }
            "max_interval_ms" => {
                retry.max_interval_ms = uint(val, &p, 1, 86_400_000, errors).unwrap_or(1)
            }
            "backoff_coefficient" => match val.as_f64() {
                Some(c) if (1.0..=10.0).contains(&c) => retry.backoff_coefficient = c,
                _ => errors.add(p, "must be a number from 1 to 10"),
            },
            "non_retryable" => match val.as_array() {
                Some(kinds) => {
                    retry.non_retryable.clear();
                    for (i, kind) in kinds.iter().enumerate() {
                        match kind.as_str().and_then(ErrorKind::parse) {
                            Some(k) => retry.non_retryable.push(k),
                            None => errors.add(
                                format!("{p}[{i}]"),
                                format!("must be one of {}", crate::status::names(ErrorKind::ALL)),
                            ),
                        }
                    }
                }
                None => errors.add(p, "must be a list of error kinds"),
            },
            _ => errors.add(p, "unknown field"),
        }
    }
    if retry.max_interval_ms < retry.initial_interval_ms {
        errors.add(
            format!("{path}.max_interval_ms"),
            "must be at least initial_interval_ms",
        );
    }
    retry
}

fn parse_approval(v: &Value, path: &str, errors: &mut Errors) -> Option<Approval> {
    let obj = v.as_object().or_else(|| {
        errors.add(path, "must be an object");
        None
    })?;
    let mut approval = Approval::default();
    for (k, val) in obj {
        let p = format!("{path}.{k}");
        match k.as_str() {
            "timeout_s" => approval.timeout_s = uint(val, &p, 1, 30 * 86_400, errors).unwrap_or(1),
            "approvers" => {
                for (i, a) in val
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .enumerate()
                {
                    match a
                        .as_str()
                        .and_then(|s| crate::ids::parse_uuid(s, "user").ok())
                    {
                        Some(id) => approval.approvers.push(id),
                        None => errors.add(format!("{p}[{i}]"), "must be a user id"),
                    }
                }
                if !val.is_array() {
                    errors.add(p, "must be a list of user ids");
                }
            }
            "quorum" => approval.quorum = uint(val, &p, 1, 20, errors).unwrap_or(1) as u32,
            _ => errors.add(p, "unknown field"),
        }
    }
    let named = approval.approvers.len();
    if named > 0 && approval.quorum as usize > named {
        errors.add(
            format!("{path}.quorum"),
            format!("must be at most the number of approvers ({named})"),
        );
    }
    Some(approval)
}

fn parse_step(i: usize, v: &Value, catalog: &Catalog, errors: &mut Errors) -> Option<Step> {
    let at = |f: &str| format!("steps[{i}].{f}");
    let Some(obj) = v.as_object() else {
        errors.add(format!("steps[{i}]"), "must be an object");
        return None;
    };
    for k in obj.keys().filter(|k| !STEP_FIELDS.contains(&k.as_str())) {
        errors.add(at(k), "unknown field");
    }
    let key = match obj.get("key").and_then(Value::as_str) {
        Some(k) if valid_key(k) => k.to_string(),
        Some(_) => {
            errors.add(at("key"), "must match ^[a-z][a-z0-9_]{0,63}$");
            return None;
        }
        None => {
            errors.add(at("key"), "is required");
            return None;
        }
    };
    let kind = match obj
        .get("kind")
        .and_then(Value::as_str)
        .and_then(StepKind::parse)
    {
        Some(k) => k,
        None => {
            errors.add(
                at("kind"),
                "must be one of agent, tool, condition, approval",
            );
            return None;
        }
    };
    let mut reference =
        |field: &str, known: &HashSet<String>, needed: bool, what: &str| -> Option<String> {
            match obj.get(field) {
                None | Some(Value::Null) if needed => {
                    errors.add(at(field), format!("is required for a {what} step"));
                    None
                }
                None | Some(Value::Null) => None,
                Some(_) if !needed => {
                    errors.add(at(field), format!("only a {what} step takes it"));
                    None
                }
                Some(v) => match v
                    .as_str()
                    .and_then(|s| crate::ids::parse_uuid(s, what).ok())
                {
                    Some(id) if known.contains(&id) => Some(id),
                    _ => {
                        let shown = v
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string());
                        errors.add(at(field), format!("no {what} {shown} in this project"));
                        None
                    }
                },
            }
        };
    let agent_id = reference(
        "agent_id",
        &catalog.agents,
        kind == StepKind::Agent,
        "agent",
    );
    let tool_id = reference("tool_id", &catalog.tools, kind == StepKind::Tool, "tool");
    let mut depends_on = Vec::new();
    match obj.get("depends_on") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (j, d) in items.iter().enumerate() {
                match d.as_str() {
                    Some(d) if depends_on.iter().any(|x| x == d) => errors.add(
                        format!("steps[{i}].depends_on[{j}]"),
                        format!("'{d}' is listed twice"),
                    ),
                    Some(d) => depends_on.push(d.to_string()),
                    None => errors.add(format!("steps[{i}].depends_on[{j}]"), "must be a step key"),
                }
            }
        }
        Some(_) => errors.add(at("depends_on"), "must be a list of step keys"),
    }
    let when = match obj.get("when") {
        None | Some(Value::Null) => None,
        Some(Value::String(w)) if !w.trim().is_empty() && w.len() <= 2000 => Some(w.clone()),
        Some(_) => {
            errors.add(
                at("when"),
                "must be a non-empty expression of at most 2000 characters",
            );
            None
        }
    };
    let retry = obj
        .get("retry")
        .map(|r| parse_retry(r, &at("retry"), errors))
        .unwrap_or_default();
    let timeout_ms = obj
        .get("timeout_ms")
        .and_then(|t| uint(t, &at("timeout_ms"), 1, 86_400_000, errors));
    let approval = match (kind, obj.get("approval")) {
        (StepKind::Approval, Some(a)) => parse_approval(a, &at("approval"), errors),
        (StepKind::Approval, None) => Some(Approval::default()),
        (_, Some(_)) => {
            errors.add(at("approval"), "only an approval step takes it");
            None
        }
        (_, None) => None,
    };
    Some(Step {
        key,
        kind,
        agent_id,
        tool_id,
        input: obj.get("input").cloned().unwrap_or(Value::Null),
        depends_on,
        when,
        retry,
        timeout_ms,
        approval,
    })
}

/// A cycle through `start`, as the keys along it, if any.
fn find_cycle(graph: &BTreeMap<&str, Vec<&str>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<'a>(
        n: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        marks: &mut HashMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Visiting) => {
                let from = stack.iter().position(|s| *s == n).unwrap_or(0);
                let mut cycle: Vec<String> = stack[from..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(n, Mark::Visiting);
        stack.push(n);
        for dep in graph.get(n).map(Vec::as_slice).unwrap_or_default() {
            if let Some(c) = visit(dep, graph, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(n, Mark::Done);
        None
    }
    let mut marks = HashMap::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// All transitive dependencies of each step (the graph must be acyclic).
fn ancestors<'a>(graph: &BTreeMap<&'a str, Vec<&'a str>>) -> HashMap<&'a str, HashSet<&'a str>> {
    fn of<'a>(
        n: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        memo: &mut HashMap<&'a str, HashSet<&'a str>>,
    ) -> HashSet<&'a str> {
        if let Some(a) = memo.get(n) {
            return a.clone();
        }
        let mut all = HashSet::new();
        for d in graph.get(n).map(Vec::as_slice).unwrap_or_default() {
            all.insert(*d);
            all.extend(of(d, graph, memo));
        }
        memo.insert(n, all.clone());
        all
    }
    let mut memo = HashMap::new();
    for n in graph.keys() {
        of(n, graph, &mut memo);
    }
    memo
}

/// Checks a definition against the project's `catalog`; every error has its path.
pub fn validate(definition: &Value, catalog: &Catalog) -> Result<Definition, Vec<FieldError>> {
    let mut errors = Errors::default();
    let Some(obj) = definition.as_object() else {
        return Err(vec![FieldError {
            field: "definition".into(),
            message: "must be an object".into(),
        }]);
    };
    for k in obj.keys().filter(|k| *k != "steps") {
        errors.add(k.clone(), "unknown field");
    }
    let raw_steps = match obj.get("steps").and_then(Value::as_array) {
        Some(s) if !s.is_empty() && s.len() <= MAX_STEPS => s.as_slice(),
        _ => {
            errors.add("steps", format!("must be a list of 1 to {MAX_STEPS} steps"));
            return Err(errors.0);
        }
    };
    let steps: Vec<(usize, Step)> = raw_steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| parse_step(i, s, catalog, &mut errors).map(|s| (i, s)))
        .collect();

    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, s) in &steps {
        if let Some(first) = index.insert(&s.key, *i) {
            errors.add(
                format!("steps[{i}].key"),
                format!("'{}' is also the key of steps[{first}]", s.key),
            );
        }
    }
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (i, s) in &steps {
        let deps = graph.entry(&s.key).or_default();
        for (j, d) in s.depends_on.iter().enumerate() {
            if d == &s.key {
                errors.add(
                    format!("steps[{i}].depends_on[{j}]"),
                    "a step cannot depend on itself",
                );
            } else if index.contains_key(d.as_str()) {
                deps.push(d);
            } else {
                errors.add(
                    format!("steps[{i}].depends_on[{j}]"),
                    format!("unknown step '{d}'"),
                );
            }
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        let first = index.get(cycle[0].as_str()).copied().unwrap_or(0);
        errors.add(
            format!("steps[{first}].depends_on"),
            format!("cycle: {}", cycle.join(" -> ")),
        );
        return Err(errors.0);
    }
    let ancestors = ancestors(&graph);
    for (i, s) in &steps {
        let reads = |k: &str| ancestors.get(s.key.as_str()).is_some_and(|a| a.contains(k));
        let why = |k: &str| {
            if index.contains_key(k) {
                "is not an ancestor of this step"
            } else {
                "does not exist"
            }
        };
        if let Some(when) = &s.when {
            match crate::expr::parse(when) {
                Ok(e) => {
                    for r in e.references() {
                        if let Source::Step(k) = &r.source
                            && !reads(k)
                        {
                            errors.add(
                                format!("steps[{i}].when"),
                                format!("reads step '{k}', which {}", why(k)),
                            );
                        }
                    }
                }
                Err(m) => errors.add(format!("steps[{i}].when"), m),
            }
        }
        match template::references(&s.input) {
            Ok(refs) => {
                for (path, r) in refs {
                    let field = if path.is_empty() {
                        format!("steps[{i}].input")
                    } else {
                        format!("steps[{i}].input.{path}")
                    };
                    if let Source::Step(k) = &r.source
                        && !ancestors
                            .get(s.key.as_str())
                            .is_some_and(|a| a.contains(k.as_str()))
                    {
                        let why = if index.contains_key(k.as_str()) {
                            "is not an ancestor of this step"
                        } else {
                            "does not exist"
                        };
                        errors.add(field, format!("reads step '{k}', which {why}"));
                    }
                }
            }
            Err(errs) => {
                for (path, m) in errs {
                    let field = if path.is_empty() {
                        format!("steps[{i}].input")
                    } else {
                        format!("steps[{i}].input.{path}")
                    };
                    errors.add(field, m);
                }
            }
        }
    }
    if errors.0.is_empty() {
        Ok(Definition {
            steps: steps.into_iter().map(|(_, s)| s).collect(),
        })
    } else {
        Err(errors.0)
    }
}

/// Parses a definition that was validated when it was saved (a pinned workflow version):
/// the same checks, with the agents and tools it names taken as the project's, since the
/// save checked them and runs keep the version they started with.
pub fn parse_saved(definition: &Value) -> Result<Definition, Vec<FieldError>> {
    let mut catalog = Catalog::default();
    for step in definition["steps"].as_array().into_iter().flatten() {
        if let Some(id) = step["agent_id"].as_str() {
            catalog.agents.insert(id.to_lowercase());
        }
        if let Some(id) = step["tool_id"].as_str() {
            catalog.tools.insert(id.to_lowercase());
        }
    }
    validate(definition, &catalog)
}

/// [`validate`] as a `422` for handlers.
pub fn validate_or_422(definition: &Value, catalog: &Catalog) -> Result<Definition, ApiError> {
    validate(definition, catalog).map_err(|errors| {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        let errors = errors
            .into_iter()
            .map(|e| FieldError {
                field: format!("definition.{}", e.field),
                message: e.message,
            })
            .collect();
        ApiError::Validation { detail, errors }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const AGENT: &str = "0191e7a2-1f6e-7000-8000-00000000000a";
    const TOOL: &str = "0191e7a2-1f6e-7000-8000-00000000000b";

    fn catalog() -> Catalog {
        Catalog {
            agents: HashSet::from([AGENT.to_string()]),
            tools: HashSet::from([TOOL.to_string()]),
        }
    }

    fn errors(def: Value) -> Vec<(String, String)> {
        validate(&def, &catalog())
            .unwrap_err()
            .into_iter()
            .map(|e| (e.field, e.message))
            .collect()
    }

    #[test]
    fn a_fan_out_fan_in_definition_is_valid() {
        let def = json!({"steps": [
            {"key": "fetch", "kind": "tool", "tool_id": TOOL, "input": {"q": "{{ input.query }}"}},
            {"key": "summarise", "kind": "agent", "agent_id": AGENT, "depends_on": ["fetch"],
             "input": "{{ steps.fetch.output.body }}", "retry": {"max_attempts": 5, "non_retryable": ["validation"]}},
            {"key": "classify", "kind": "agent", "agent_id": AGENT, "depends_on": ["fetch"], "when": "input.classify == true"},
            {"key": "review", "kind": "approval", "depends_on": ["summarise", "classify"], "approval": {"timeout_s": 3600},
             "input": {"text": "{{ steps.summarise.output.text }} / {{ steps.fetch.output.title }}"}},
        ]});
        let d = validate(&def, &catalog()).unwrap();
        assert_eq!(d.steps.len(), 4);
        assert_eq!(d.steps[1].retry.max_attempts, 5);
        assert_eq!(
            d.steps[3].approval,
            Some(Approval {
                timeout_s: 3600,
                approvers: vec![],
                quorum: 1
            })
        );
    }

    #[test]
    fn bad_definitions_report_each_error_with_its_exact_path() {
        let kinds = format!("must be one of {}", crate::status::names(ErrorKind::ALL));
        let not_a_tool = format!("no tool {AGENT} in this project");
        let table: Vec<(Value, Vec<(&str, &str)>)> = vec![
            (
                json!({}),
                vec![("steps", "must be a list of 1 to 200 steps")],
            ),
            (
                json!({"steps": [], "x": 1}),
                vec![
                    ("x", "unknown field"),
                    ("steps", "must be a list of 1 to 200 steps"),
                ],
            ),
            (
                json!({"steps": [{"key": "A", "kind": "tool"}]}),
                vec![("steps[0].key", "must match ^[a-z][a-z0-9_]{0,63}$")],
            ),
            (
                json!({"steps": [{"key": "a", "kind": "robot"}]}),
                vec![(
                    "steps[0].kind",
                    "must be one of agent, tool, condition, approval",
                )],
            ),
            (
                json!({"steps": [{"key": "a", "kind": "condition"}, {"key": "a", "kind": "condition"}]}),
                vec![("steps[1].key", "'a' is also the key of steps[0]")],
            ),
            (
                json!({"steps": [{"key": "a", "kind": "condition", "depends_on": ["fetch"]}]}),
                vec![("steps[0].depends_on[0]", "unknown step 'fetch'")],
            ),
            (
                json!({"steps": [{"key": "a", "kind": "condition", "depends_on": ["a"]}]}),
                vec![("steps[0].depends_on[0]", "a step cannot depend on itself")],
            ),
            (
                json!({"steps": [
                    {"key": "a", "kind": "condition", "depends_on": ["c"]},
                    {"key": "b", "kind": "condition", "depends_on": ["a"]},
                    {"key": "c", "kind": "condition", "depends_on": ["b"]}]}),
                vec![("steps[0].depends_on", "cycle: a -> c -> b -> a")],
            ),
            (
                json!({"steps": [{"key": "a", "kind": "agent"}]}),
                vec![("steps[0].agent_id", "is required for a agent step")],
            ),
            (
                json!({"steps": [{"key": "a", "kind": "tool", "tool_id": AGENT}]}),
                vec![("steps[0].tool_id", &not_a_tool)],
            ),
            (
                json!({"steps": [{"key": "a", "kind": "tool", "tool_id": TOOL, "agent_id": AGENT}]}),
                vec![("steps[0].agent_id", "only a agent step takes it")],
            ),
            (
                json!({"steps": [
                    {"key": "a", "kind": "condition"},
                    {"key": "b", "kind": "condition", "input": {"x": ["{{ steps.a.output.y }}"]}}]}),
                vec![(
                    "steps[1].input.x[0]",
                    "reads step 'a', which is not an ancestor of this step",
                )],
            ),
            (
                json!({"steps": [
                    {"key": "a", "kind": "condition"},
                    {"key": "b", "kind": "condition", "when": "steps.a.output.ok == true"},
                    {"key": "c", "kind": "condition", "when": "input.n >"}]}),
                vec![
                    (
                        "steps[1].when",
                        "reads step 'a', which is not an ancestor of this step",
                    ),
                    ("steps[2].when", "the expression ends too early"),
                ],
            ),
            (
                json!({"steps": [{"key": "a", "kind": "condition", "input": "{{ steps.zz.output }}"}]}),
                vec![("steps[0].input", "reads step 'zz', which does not exist")],
            ),
            (
                json!({"steps": [{"key": "a", "kind": "condition", "retry": {"max_attempts": 21, "backoff_coefficient": 0.5, "non_retryable": ["oops"]}}]}),
                vec![
                    (
                        "steps[0].retry.backoff_coefficient",
                        "must be a number from 1 to 10",
                    ),
                    (
                        "steps[0].retry.max_attempts",
                        "must be an integer from 1 to 20",
                    ),
                    ("steps[0].retry.non_retryable[0]", &kinds),
                ],
            ),
            (
                json!({"steps": [{"key": "a", "kind": "condition", "timeout_ms": 0, "approval": {}, "color": "red"}]}),
                vec![
                    ("steps[0].color", "unknown field"),
                    (
                        "steps[0].timeout_ms",
                        "must be an integer from 1 to 86400000",
                    ),
                    ("steps[0].approval", "only an approval step takes it"),
                ],
            ),
        ];
        for (def, want) in table {
            let want: Vec<(String, String)> = want
                .into_iter()
                .map(|(f, m)| (f.to_string(), m.to_string()))
                .collect();
            assert_eq!(errors(def.clone()), want, "{def}");
        }
    }

    #[test]
    fn the_422_prefixes_paths_with_definition() {
        let err = validate_or_422(&json!({"steps": [{"key": "a", "kind": "x"}]}), &catalog())
            .unwrap_err();
        let ApiError::Validation { errors, .. } = err else {
            panic!()
        };
        assert_eq!(errors[0].field, "definition.steps[0].kind");
    }

    #[test]
    fn a_saved_definition_parses_without_the_projects_catalog() {
        let def = json!({"steps": [
            {"key": "a", "kind": "agent", "agent_id": AGENT, "input": {}},
            {"key": "b", "kind": "tool", "tool_id": AGENT, "depends_on": ["a"], "input": {}}
        ]});
        let parsed = parse_saved(&def).unwrap();
        assert_eq!(parsed.steps[1].depends_on, ["a"]);
        let cyclic = json!({"steps": [{"key": "a", "kind": "condition", "depends_on": ["a"]}]});
        assert!(parse_saved(&cyclic).is_err());
    }

    #[test]
    fn an_approval_quorum_fits_its_approvers() {
        let a = "0191e7a2-1f6e-7000-8000-000000000001";
        let b = "0191e7a2-1f6e-7000-8000-000000000002";
        let def = |approval: Value| json!({"steps": [{"key": "ok", "kind": "approval", "approval": approval}]});
        let d = validate(&def(json!({"approvers": [a, b], "quorum": 2})), &catalog()).unwrap();
        assert_eq!(d.steps[0].approval.as_ref().unwrap().quorum, 2);
        let errors =
            validate(&def(json!({"approvers": [a], "quorum": 2})), &catalog()).unwrap_err();
        assert_eq!(errors[0].field, "steps[0].approval.quorum");
        assert!(validate(&def(json!({"quorum": 0})), &catalog()).is_err());
        let anyone = validate(&def(json!({"quorum": 3})), &catalog()).unwrap();
        assert_eq!(anyone.steps[0].approval.as_ref().unwrap().quorum, 3);
    }
}
