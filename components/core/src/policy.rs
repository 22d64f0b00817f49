//! Policy rules (API.md "Policies"): parsed and checked when saved, every problem with its
//! path under `rules`. Enforcement comes with the run engine; what is here decides what a
//! valid rule set is and how model globs match.

use serde_json::{Map, Value, json};

use crate::error::FieldError;
use crate::money::Usd;

/// A spending limit over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub limit_usd: Usd,
    pub window: Window,
    /// `true` blocks calls past the limit; `false` only alerts.
    pub block: bool,
    /// What a blocked call does.
    pub on_exhausted: OnExhausted,
}

/// What a call a blocking budget refuses does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnExhausted {
    /// Its step fails (`policy-violation`).
    #[default]
    Fail,
    /// Its step waits until the window turns or the budget is raised, then goes on.
    Wait,
    /// Its step waits for a project admin to let the call pass the budget, or to refuse it.
    Ask,
}

impl OnExhausted {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "fail" => Self::Fail,
            "wait" => Self::Wait,
            "ask" => Self::Ask,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fail => "fail",
            Self::Wait => "wait",
            Self::Ask => "ask",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Day,
    Month,
    Total,
}

impl Window {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "day" => Self::Day,
            "month" => Self::Month,
            "total" => Self::Total,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
            Self::Total => "total",
        }
    }

    /// When the window holding `at` ends (UTC days and months); `None` for `total`.
    pub fn end_after(
        self,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        use chrono::{Datelike, TimeZone};
        let date = at.date_naive();
        let next = match self {
            Self::Day => date.succ_opt()?,
            Self::Month => {
                let (y, m) = if date.month() == 12 {
                    (date.year() + 1, 1)
                } else {
                    (date.year(), date.month() + 1)
                };
                chrono::NaiveDate::from_ymd_opt(y, m, 1)?
            }
            Self::Total => return None,
        };
        chrono::Utc
            .from_local_datetime(&next.and_hms_opt(0, 0, 0)?)
            .single()
    }
}

/// The rules of one policy; absent rules do not restrict.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    pub budget: Option<Budget>,
    pub allowed_models: Option<Vec<String>>,
    /// Tool ids.
    pub allowed_tools: Option<Vec<String>>,
    pub max_steps_per_run: Option<i64>,
    pub max_tokens_per_run: Option<i64>,
    pub max_tokens_per_step: Option<i64>,
    pub max_concurrent_runs: Option<i64>,
}

const LIMITS: [&str; 4] = [
    "max_steps_per_run",
    "max_tokens_per_run",
    "max_tokens_per_step",
    "max_concurrent_runs",
];

/// The largest count a limit may name.
const MAX_LIMIT: i64 = 1_000_000_000_000;

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: format!("rules.{}", field.into()),
            message: message.into(),
        });
    }
}

/// Parses `rules`; tool ids are checked for form here and for ownership by the caller.
pub fn parse_rules(v: &Value) -> Result<Rules, Vec<FieldError>> {
    let mut errors = Errors(Vec::new());
    let Some(obj) = v.as_object() else {
        return Err(vec![FieldError {
            field: "rules".into(),
            message: "must be an object".into(),
        }]);
    };
    let mut rules = Rules::default();
    for (key, value) in obj {
        match key.as_str() {
            "budget" => rules.budget = parse_budget(value, &mut errors),
            "allowed_models" => {
                rules.allowed_models =
                    strings(value, key, &mut errors, |s| check_model_glob(s).err())
            }
            "allowed_tools" => {
                // Tool ids, and MCP tools as mcp:<server>/<tool> or mcp:<server>/*.
                rules.allowed_tools = strings(value, key, &mut errors, |s| {
                    if s.starts_with("mcp:") {
                        return crate::mcp::parse_ref(s, true)
                            .err()
                            .map(|_| "must be mcp:<server>/<tool> or mcp:<server>/*".to_string());
                    }
                    crate::ids::parse_uuid(s, "tool")
                        .err()
                        .map(|_| "must be a tool id or mcp:<server>/<tool>".to_string())
                })
                .map(|ids| {
                    ids.into_iter()
                        .map(|s| {
                            if s.starts_with("mcp:") {
                                s
                            } else {
                                s.to_lowercase()
                            }
                        })
                        .collect()
                })
            }
            k if LIMITS.contains(&k) => {
                let n = value.as_i64().filter(|n| (1..=MAX_LIMIT).contains(n));
                if n.is_none() {
                    errors.add(k, "must be a positive integer");
                }
                match k {
                    "max_steps_per_run" => rules.max_steps_per_run = n,
                    "max_tokens_per_run" => rules.max_tokens_per_run = n,
                    "max_tokens_per_step" => rules.max_tokens_per_step = n,
                    _ => rules.max_concurrent_runs = n,
                }
            }
            other => errors.add(other, "unknown rule"),
        }
    }
    if errors.0.is_empty() {
        Ok(rules)
    } else {
        Err(errors.0)
    }
}

fn parse_budget(v: &Value, errors: &mut Errors) -> Option<Budget> {
    let Some(obj) = v.as_object() else {
        errors.add("budget", "must be an object");
        return None;
    };
    for k in obj
        .keys()
        .filter(|k| !["limit_usd", "window", "action", "on_exhausted"].contains(&k.as_str()))
    {
        errors.add(format!("budget.{k}"), "unknown field");
    }
    let limit = match obj.get("limit_usd").map(Usd::from_json) {
        None => {
            errors.add("budget.limit_usd", "is required");
            None
        }
        Some(Err(m)) => {
            errors.add("budget.limit_usd", m);
            None
        }
        Some(Ok(u)) if !u.is_positive() => {
            errors.add("budget.limit_usd", "must be more than zero");
            None
        }
        Some(Ok(u)) => Some(u),
    };
    let window = match obj.get("window").and_then(Value::as_str).map(Window::parse) {
        Some(Some(w)) => Some(w),
        _ => {
            errors.add("budget.window", "must be one of day, month, total");
            None
        }
    };
    let block = match obj.get("action").map(|a| a.as_str()) {
        None | Some(Some("block")) => Some(true),
        Some(Some("alert")) => Some(false),
        _ => {
            errors.add("budget.action", "must be block or alert");
            None
        }
    };
    let on_exhausted = match obj
        .get("on_exhausted")
        .map(|a| a.as_str().and_then(OnExhausted::parse))
    {
        None => Some(OnExhausted::Fail),
        Some(Some(OnExhausted::Fail)) => Some(OnExhausted::Fail),
        Some(Some(_)) if block == Some(false) => {
            errors.add(
                "budget.on_exhausted",
                "applies only to a blocking budget (action block)",
            );
            None
        }
        Some(Some(o)) => Some(o),
        Some(None) => {
            errors.add("budget.on_exhausted", "must be one of fail, wait, ask");
            None
        }
    };
    Some(Budget {
        limit_usd: limit?,
        window: window?,
        block: block?,
        on_exhausted: on_exhausted?,
    })
}

/// A non-empty list of distinct strings, each checked by `check` (which returns a message).
fn strings(
    v: &Value,
    field: &str,
    errors: &mut Errors,
    check: impl Fn(&str) -> Option<String>,
) -> Option<Vec<String>> {
    let Some(items) = v.as_array().filter(|a| (1..=200).contains(&a.len())) else {
        errors.add(field, "must be a list of 1 to 200 entries");
        return None;
    };
    let mut out: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.as_str() {
            Some(s) => match check(s) {
                Some(m) => errors.add(format!("{field}[{i}]"), m),
                None if out.iter().any(|o| o == s) => {
                    errors.add(format!("{field}[{i}]"), "is listed twice")
                }
                None => out.push(s.to_string()),
            },
            None => errors.add(format!("{field}[{i}]"), "must be a string"),
        }
    }
    Some(out)
}

/// A model name: `provider/model`, e.g. `openai/gpt-4o-mini`.
pub fn check_model_name(model: &str) -> Result<(), &'static str> {
    const MESSAGE: &str = "must be provider/model, e.g. openai/gpt-4o-mini";
    let (provider, name) = model.split_once('/').ok_or(MESSAGE)?;
    let provider_ok = !provider.is_empty()
        && provider.len() <= 64
        && provider
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
    let name_ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if provider_ok && name_ok {
        Ok(())
    } else {
        Err(MESSAGE)
    }
}

/// A model glob: `provider/model` where `*` matches any run of characters
/// (`openai/*`, `*/gpt-4o-mini`, `*`).
pub fn check_model_glob(s: &str) -> Result<(), String> {
    let ok = (1..=200).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._:-*".contains(&b))
        && (s == "*" || s.contains('/'));
    if ok {
        Ok(())
    } else {
        Err("must be a model glob such as openai/* or anthropic/claude-*".into())
    }
}

/// Whether `model` matches `glob` (`*` matches any run of characters, `/` included).
pub fn glob_matches(glob: &str, model: &str) -> bool {
    let parts: Vec<&str> = glob.split('*').collect();
    if parts.len() == 1 {
        return glob == model;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !model.starts_with(first) || model.len() < first.len() + last.len() || !model.ends_with(last)
    {
        return false;
    }
    let mut rest = &model[first.len()..model.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

impl Rules {
    /// The rules as stored and answered.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(b) = &self.budget {
            m.insert(
                "budget".into(),
                json!({
                    "limit_usd": b.limit_usd.to_fixed(),
                    "window": b.window.as_str(),
                    "action": if b.block { "block" } else { "alert" },
                    "on_exhausted": b.on_exhausted.as_str(),
                }),
            );
        }
        if let Some(v) = &self.allowed_models {
            m.insert("allowed_models".into(), json!(v));
        }
        if let Some(v) = &self.allowed_tools {
            m.insert("allowed_tools".into(), json!(v));
        }
        for (k, v) in LIMITS.iter().zip([
            self.max_steps_per_run,
            self.max_tokens_per_run,
            self.max_tokens_per_step,
            self.max_concurrent_runs,
        ]) {
            if let Some(v) = v {
                m.insert((*k).into(), json!(v));
            }
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Value) -> Vec<String> {
        parse_rules(&v)
            .unwrap_err()
            .into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    #[test]
    fn a_full_rule_set_round_trips_in_its_stored_form() {
        let tool = "0191e7a2-1f6e-7fff-bfff-ffffffffffff";
        let rules = parse_rules(&json!({
            "budget": {"limit_usd": "25.5", "window": "month", "action": "alert"},
            "allowed_models": ["openai/*", "anthropic/claude-*"],
            "allowed_tools": [tool, "mcp:docs/search", "mcp:github/*"],
            "max_steps_per_run": 20,
            "max_tokens_per_run": 100000,
            "max_tokens_per_step": 4000,
            "max_concurrent_runs": 3
        }))
        .unwrap();
        assert_eq!(
            rules.to_json(),
            json!({
                "budget": {"limit_usd": "25.500000", "window": "month", "action": "alert", "on_exhausted": "fail"},
                "allowed_models": ["openai/*", "anthropic/claude-*"],
                "allowed_tools": [tool, "mcp:docs/search", "mcp:github/*"],
                "max_steps_per_run": 20,
                "max_tokens_per_run": 100000,
                "max_tokens_per_step": 4000,
                "max_concurrent_runs": 3
            })
        );
        assert_eq!(parse_rules(&rules.to_json()).unwrap(), rules);
    }

    #[test]
    fn an_exhausted_budget_fails_waits_or_asks_and_windows_end_at_utc_midnight() {
        let rules = parse_rules(
            &json!({"budget": {"limit_usd": 1, "window": "day", "on_exhausted": "wait"}}),
        )
        .unwrap();
        assert_eq!(rules.budget.unwrap().on_exhausted, OnExhausted::Wait);
        assert_eq!(
            fields(
                json!({"budget": {"limit_usd": 1, "window": "day", "action": "alert", "on_exhausted": "ask"}})
            ),
            ["rules.budget.on_exhausted: applies only to a blocking budget (action block)"]
        );
        assert_eq!(
            fields(json!({"budget": {"limit_usd": 1, "window": "day", "on_exhausted": "later"}})),
            ["rules.budget.on_exhausted: must be one of fail, wait, ask"]
        );
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-31T18:30:00Z")
            .unwrap()
            .to_utc();
        let end = |w: Window| w.end_after(at).map(|t| t.to_rfc3339());
        assert_eq!(
            end(Window::Day).as_deref(),
            Some("2027-01-01T00:00:00+00:00")
        );
        assert_eq!(
            end(Window::Month).as_deref(),
            Some("2027-01-01T00:00:00+00:00")
        );
        let mid = chrono::DateTime::parse_from_rfc3339("2026-02-10T00:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            Window::Month.end_after(mid).unwrap().to_rfc3339(),
            "2026-03-01T00:00:00+00:00"
        );
        assert_eq!(Window::Total.end_after(at), None);
    }

    #[test]
    fn a_budget_blocks_unless_told_to_alert() {
        let rules = parse_rules(&json!({"budget": {"limit_usd": 10, "window": "day"}})).unwrap();
        assert!(rules.budget.unwrap().block);
    }

    #[test]
    fn every_bad_rule_is_reported_at_its_path() {
        assert_eq!(
            fields(json!({
                "budget": {"limit_usd": "0", "window": "week", "action": "warn", "cap": 1},
                "allowed_models": ["gpt 4", "openai/*", "openai/*"],
                "allowed_tools": ["nope", "mcp:Docs/x"],
                "max_steps_per_run": 0,
                "max_tokens_per_run": 1.5,
                "max_spend": 3
            })),
            [
                "rules.allowed_models[0]: must be a model glob such as openai/* or anthropic/claude-*",
                "rules.allowed_models[2]: is listed twice",
                "rules.allowed_tools[0]: must be a tool id or mcp:<server>/<tool>",
                "rules.allowed_tools[1]: must be mcp:<server>/<tool> or mcp:<server>/*",
                "rules.budget.cap: unknown field",
                "rules.budget.limit_usd: must be more than zero",
                "rules.budget.window: must be one of day, month, total",
                "rules.budget.action: must be block or alert",
                "rules.max_spend: unknown rule",
                "rules.max_steps_per_run: must be a positive integer",
                "rules.max_tokens_per_run: must be a positive integer",
            ]
        );
        assert_eq!(fields(json!([])), ["rules: must be an object"]);
        assert_eq!(
            fields(json!({"allowed_models": []})),
            ["rules.allowed_models: must be a list of 1 to 200 entries"]
        );
    }

    #[test]
    fn model_names_are_provider_slash_model() {
        assert!(check_model_name("openai/gpt-4o-mini").is_ok());
        assert!(check_model_name("local_llm/llama3.1:8b").is_ok());
        for bad in [
            "gpt-4o",
            "/gpt",
            "openai/",
            "Open AI/gpt",
            "openai/gpt 4",
            "a/b/c",
        ] {
            assert!(check_model_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn model_globs_match_whole_names() {
        assert!(glob_matches("openai/*", "openai/gpt-4o-mini"));
        assert!(glob_matches("*", "anthropic/claude-3-5-haiku"));
        assert!(glob_matches(
            "anthropic/claude-*-haiku",
            "anthropic/claude-3-5-haiku"
        ));
        assert!(glob_matches("openai/gpt-4o", "openai/gpt-4o"));
        assert!(!glob_matches("openai/gpt-4o", "openai/gpt-4o-mini"));
        assert!(!glob_matches("openai/*", "azure/openai-gpt"));
        assert!(!glob_matches("*-mini", "openai/gpt-4o"));
        assert!(!glob_matches("a*a", "a"));
    }
}
