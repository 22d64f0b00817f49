//! JSON Schema for tool inputs and outputs, workflow inputs and agents' structured answers:
//! schemas are checked against their meta-schema when saved (2020-12 unless they name
//! another draft with `$schema`), and values are checked against them at run time. No
//! reference is ever fetched: a `$ref` outside the document makes the schema invalid.
//!
//! A value is checked with [`validate`] against a schema from outside (an MCP server's),
//! and with [`validate_saved`] against one this service checked when it was saved.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{Draft, Registry, Validator};
use serde_json::{Value, json};

/// The most problems reported for one value: enough to fix it, bounded in size.
const MAX_REPORTED: usize = 20;

/// `Ok` when `schema` is a valid JSON Schema whose references all resolve inside it.
pub fn check(schema: &Value) -> Result<(), String> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err("must be a JSON Schema (an object or a boolean)".into());
    }
    // Compiling checks the schema against its meta-schema first (once: on wasm the crate
    // builds the meta-schema's validator anew for every check), then resolves its references.
    match jsonschema::validator_for(schema) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.kind(), ValidationErrorKind::Referencing(_)) => {
            Err(format!("is not a usable JSON Schema: {e}"))
        }
        Err(e) => Err(format!("is not a valid JSON Schema: {e}")),
    }
}

/// Like [`check`], and the schema must describe a JSON object (`"type": "object"`), as
/// function-calling models and tool inputs require.
pub fn check_object(schema: &Value) -> Result<(), String> {
    check(schema)?;
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        return Err("must describe an object (\"type\": \"object\")".into());
    }
    Ok(())
}

/// Checks `value` against `schema`: every problem as `(JSON pointer in the value, message)`.
pub fn validate(schema: &Value, value: &Value) -> Result<(), Vec<(String, String)>> {
    let validator = jsonschema::validator_for(schema).map_err(unusable)?;
    problems(&validator, value)
}

/// Where a saved schema is compiled: the base `jsonschema` gives a document without an
/// absolute `$id`, so a relative `$id` and the references against it resolve as they do in
/// a full compile. The root that refers to it is placed elsewhere.
const SAVED: &str = "json-schema:///";
const ROOT: &str = "urn:sparkops:saved-schema-root";

/// [`validate`] for a schema that passed [`check`] when it was saved (a tool's, an agent's
/// or a workflow's): the same answer, without checking the schema against its meta-schema
/// again. That check is most of the cost of a step's validation on wasm, where `jsonschema`
/// builds the meta-schema's validator anew on every compile (about 1.3 of 1.5 ms under
/// Spin) and offers no switch to skip it. So the saved schema is compiled as a resource of
/// its own draft behind a root that only refers to it, `{"$ref": ...}` read as draft 4,
/// whose meta-check is the smallest the crate has. `tests/properties.rs` holds both paths
/// to the same answers over generated schemas and values.
pub fn validate_saved(schema: &Value, value: &Value) -> Result<(), Vec<(String, String)>> {
    let draft = Draft::default().detect(schema);
    if !schema.is_object() || draft == Draft::Unknown {
        return validate(schema, value);
    }
    // The key is the schema's text: two schemas are the same schema exactly when their
    // texts are (`serde_json` keeps an object's keys in one order).
    let key = schema.to_string();
    let cached = COMPILED.with(|c| c.borrow().get(&key).cloned());
    let validator = match cached {
        Some(v) => v,
        None => {
            let registry = Registry::new()
                .add(SAVED, draft.create_resource_ref(schema))
                .and_then(|r| r.prepare())
                .map_err(unusable)?;
            let compiled = jsonschema::options()
                .with_draft(Draft::Draft4)
                .with_base_uri(ROOT)
                .with_registry(&registry)
                .build(&json!({ "$ref": SAVED }))
                .map_err(unusable)?;
            let compiled = Rc::new(compiled);
            COMPILED.with(|c| {
                let mut c = c.borrow_mut();
                if c.len() >= MAX_COMPILED {
                    c.clear();
                }
                c.insert(key, compiled.clone());
            });
            compiled
        }
    };
    problems(&validator, value)
}

/// The most saved schemas an instance keeps compiled.
const MAX_COMPILED: usize = 64;

thread_local! {
    /// Saved schemas compiled by this instance, by their text. Even without the meta-check a
    /// compile costs most of a check on wasm, and an instance checks the same schema again
    /// and again: a tool's input and output in a chain of its calls, or an agent's tool
    /// calls in its loop. Keyed by text, an entry is never stale; under Spin it lives as
    /// long as the instance, one request.
    static COMPILED: RefCell<HashMap<String, Rc<Validator>>> = RefCell::new(HashMap::new());
}

fn unusable(e: impl std::fmt::Display) -> Vec<(String, String)> {
    vec![(String::new(), format!("the schema is not usable: {e}"))]
}

fn problems(validator: &Validator, value: &Value) -> Result<(), Vec<(String, String)>> {
    let problems: Vec<(String, String)> = validator
        .iter_errors(value)
        .take(MAX_REPORTED)
        .map(|e| (e.instance_path().to_string(), e.to_string()))
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_schemas_pass_and_malformed_ones_are_named() {
        assert!(check(&json!({"type": "object", "properties": {"q": {"type": "string"}}})).is_ok());
        assert!(check(&json!(true)).is_ok());
        for bad in [
            json!({"type": "no-such-type"}),
            json!({"properties": {"q": {"minLength": -1}}}),
            json!({"required": "q"}),
        ] {
            let said = check(&bad).expect_err("malformed");
            assert!(
                said.starts_with("is not a valid JSON Schema: "),
                "{bad}: {said}"
            );
        }
        for not_a_schema in [json!("object"), json!(3)] {
            let said = check(&not_a_schema).expect_err("not a schema");
            assert!(said.starts_with("must be a JSON Schema"), "{said}");
        }
    }

    #[test]
    fn a_remote_reference_is_never_fetched_and_makes_the_schema_invalid() {
        let schema = json!({"$ref": "https://example.com/schema.json"});
        let said = check(&schema).expect_err("unresolvable");
        assert!(said.starts_with("is not a usable JSON Schema: "), "{said}");
        let local =
            json!({"$defs": {"q": {"type": "string"}}, "properties": {"q": {"$ref": "#/$defs/q"}}});
        assert!(check(&local).is_ok());
    }

    #[test]
    fn tool_inputs_must_be_objects() {
        assert!(check_object(&json!({"type": "object"})).is_ok());
        assert!(check_object(&json!({"type": "string"})).is_err());
        assert!(check_object(&json!({})).is_err());
    }

    #[test]
    fn values_are_checked_with_the_path_of_each_problem() {
        let schema = json!({
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "maximum": 7}}
        });
        assert!(validate(&schema, &json!({"city": "Oslo", "days": 3})).is_ok());
        let problems = validate(&schema, &json!({"days": 9})).unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["", "/days"]);
        assert!(problems[0].1.contains("city"), "{problems:?}");
    }
}
