//! JSON merge patch (RFC 7386), the body of every `PATCH` (API.md "Writes"), and the
//! `If-Match` precondition that guards it (RFC 9110 13.1.1).

use serde_json::Value;

/// Applies `patch` to `target`: objects merge key by key, `null` removes a key, anything
/// else replaces the value whole (arrays included).
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(fields) = target else {
        unreachable!("made an object above")
    };
    for (key, change) in changes {
        if change.is_null() {
            fields.remove(key);
        } else {
            merge(fields.entry(key.clone()).or_insert(Value::Null), change);
        }
    }
}

/// An `If-Match` header: `*`, or a list of entity tags. Versions are the strong tags
/// (`"3"`); a weak tag (`W/"3"`) is kept only to be counted, since If-Match compares
/// strongly and a weak tag never matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    Any,
    Tags(Vec<i64>),
}

impl IfMatch {
    /// Parses the header; `Err` when it is not `*` or a comma-separated list of quoted tags.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        const FORMAT: &str = "must be * or an entity tag such as \"3\"";
        if raw.trim() == "*" {
            return Ok(IfMatch::Any);
        }
        let mut strong = Vec::new();
        for tag in raw.split(',').map(str::trim) {
            let (weak, quoted) = match tag.strip_prefix("W/") {
                Some(rest) => (true, rest),
                None => (false, tag),
            };
            let inner = quoted
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .ok_or(FORMAT)?;
            let version = inner.parse::<i64>().map_err(|_| FORMAT)?;
            if !weak {
                strong.push(version);
            }
        }
        Ok(IfMatch::Tags(strong))
    }

    /// Whether a resource at `version` meets the precondition.
    pub fn matches(&self, version: i64) -> bool {
        match self {
            IfMatch::Any => true,
            IfMatch::Tags(versions) => versions.contains(&version),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_examples_of_rfc_7386_hold() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut target, patch, want) in cases {
            merge(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn if_match_compares_strongly_so_a_weak_tag_never_matches() {
        assert!(IfMatch::parse("\"3\"").unwrap().matches(3));
        assert!(!IfMatch::parse("\"3\"").unwrap().matches(4));
        assert!(!IfMatch::parse("W/\"3\"").unwrap().matches(3));
        assert!(IfMatch::parse("W/\"3\", \"3\"").unwrap().matches(3));
        assert!(IfMatch::parse("\"2\", \"3\"").unwrap().matches(3));
        assert!(IfMatch::parse("*").unwrap().matches(7));
        for bad in ["3", "\"x\"", "W/3", "", "\"3"] {
            assert!(IfMatch::parse(bad).is_err(), "{bad}");
        }
    }
}
