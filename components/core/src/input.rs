//! Request bodies: JSON objects read field by field, unknown fields denied, every problem
//! reported with its field path; and the domain values that can only exist valid.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::error::{ApiError, FieldError};
use crate::roles::Role;

/// A JSON object body being read. Each accessor records an error instead of failing, so a
/// caller sees every problem at once; [`Body::finish`] reports them with unknown fields.
pub struct Body {
    map: Map<String, Value>,
    seen: BTreeSet<String>,
    errors: Vec<FieldError>,
}

/// The path (`input.items[2].name`) of the first string in `value`, key or value, that holds
/// a NUL character: Postgres stores neither `text` nor `jsonb` with one, so it is refused at
/// the edge, naming the field, before anything is written.
pub fn nul_field(value: &Value, path: &str) -> Option<String> {
    let here = || if path.is_empty() { "body" } else { path }.to_string();
    let child = |key: &str| match path {
        "" => key.to_string(),
        _ => format!("{path}.{key}"),
    };
    match value {
        Value::String(s) if s.contains('\0') => Some(here()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_field(v, &format!("{}[{i}]", here()))),
        Value::Object(map) => map.iter().find_map(|(k, v)| match k.contains('\0') {
            true => Some(child(&k.replace('\0', "\\u0000"))),
            false => nul_field(v, &child(k)),
        }),
        _ => None,
    }
}

/// The `422` for a NUL character in `field`.
pub fn nul_error(field: &str) -> ApiError {
    ApiError::field(field, "must not contain the NUL character (\\u0000)")
}

impl Body {
    /// Parses a JSON object; anything else is a `422` on `body`.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::field("body", format!("not valid JSON: {e}")))?;
        Self::from_value(value)
    }

    /// [`Body::parse`] for a request whose body is optional: an empty one is `{}`.
    pub fn parse_or_empty(bytes: &[u8]) -> Result<Self, ApiError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            Self::from_value(Value::Object(Map::new()))
        } else {
            Self::parse(bytes)
        }
    }

    pub fn from_value(value: Value) -> Result<Self, ApiError> {
        if let Some(field) = nul_field(&value, "") {
            return Err(nul_error(&field));
        }
        match value {
            Value::Object(map) => Ok(Self {
                map,
                seen: BTreeSet::new(),
                errors: Vec::new(),
            }),
            _ => Err(ApiError::field("body", "must be a JSON object")),
        }
    }

    /// A body of `application/x-www-form-urlencoded` pairs, read as string fields.
    pub fn from_form(bytes: &[u8]) -> Result<Self, ApiError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ApiError::field("body", "not UTF-8"))?;
        let mut map = Map::new();
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            map.insert(percent_decode(k)?, Value::String(percent_decode(v)?));
        }
        // The same checks as a JSON body (a NUL anywhere is refused).
        Self::from_value(Value::Object(map))
    }

    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn take(&mut self, field: &str) -> Option<Value> {
        self.seen.insert(field.to_string());
        self.map.get(field).cloned()
    }

    /// Whether the field was sent at all (`null` included), for merge patches.
    pub fn has(&self, field: &str) -> bool {
        self.map.contains_key(field)
    }

    /// A string of 1..=`max` characters, or `None` (absent or `null`).
    pub fn opt_str(&mut self, field: &str, max: usize) -> Option<String> {
        match self.take(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.chars().count() > max => {
                self.error(field, format!("must be at most {max} characters"));
                None
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                self.error(field, "must not be empty");
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.error(field, "must be a string");
                None
            }
        }
    }

    /// A required string of 1..=`max` characters.
    pub fn str(&mut self, field: &str, max: usize) -> Option<String> {
        let present = self.map.get(field).is_some_and(|v| !v.is_null());
        let value = self.opt_str(field, max);
        if !present {
            self.error(field, "is required");
        }
        value
    }

    /// A required [`Email`].
    pub fn email(&mut self, field: &str) -> Option<Email> {
        let raw = self.str(field, 254)?;
        match Email::parse(&raw) {
            Ok(e) => Some(e),
            Err(msg) => {
                self.error(field, msg);
                None
            }
        }
    }

    /// An optional integer in `range`.
    pub fn opt_int(&mut self, field: &str, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
        match self.take(field) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64().filter(|n| range.contains(n)) {
                Some(n) => Some(n),
                None => {
                    self.error(
                        field,
                        format!(
                            "must be an integer from {} to {}",
                            range.start(),
                            range.end()
                        ),
                    );
                    None
                }
            },
        }
    }

    /// An optional boolean, `default` when absent.
    pub fn bool_or(&mut self, field: &str, default: bool) -> bool {
        match self.take(field) {
            None | Some(Value::Null) => default,
            Some(Value::Bool(b)) => b,
            Some(_) => {
                self.error(field, "must be true or false");
                default
            }
        }
    }

    /// An optional string that must be one of `choices`; `default` when absent.
    pub fn one_of(
        &mut self,
        field: &str,
        choices: &[&'static str],
        default: &'static str,
    ) -> &'static str {
        match self.take(field) {
            None | Some(Value::Null) => default,
            Some(Value::String(s)) if choices.contains(&s.as_str()) => choices
                .iter()
                .find(|c| **c == s)
                .copied()
                .unwrap_or(default),
            Some(_) => {
                self.error(field, format!("must be one of {}", choices.join(", ")));
                default
            }
        }
    }

    /// Any JSON value but `null`, unchecked.
    pub fn opt_value(&mut self, field: &str) -> Option<Value> {
        self.take(field).filter(|v| !v.is_null())
    }

    /// An optional JSON object.
    pub fn opt_object(&mut self, field: &str) -> Option<Map<String, Value>> {
        match self.take(field) {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => {
                self.error(field, "must be an object");
                None
            }
        }
    }

    /// An optional JSON Schema, checked against its meta-schema; `object` demands an object
    /// schema (tool inputs).
    pub fn opt_schema(&mut self, field: &str, object: bool) -> Option<Value> {
        let schema = self.opt_value(field)?;
        let checked = if object {
            crate::schema::check_object(&schema)
        } else {
            crate::schema::check(&schema)
        };
        match checked {
            Ok(()) => Some(schema),
            Err(m) => {
                self.error(field, m);
                None
            }
        }
    }

    /// An optional list of distinct UUIDs (lowercased), at most `max`.
    pub fn opt_uuids(&mut self, field: &str, max: usize) -> Option<Vec<String>> {
        let items = match self.take(field) {
            None | Some(Value::Null) => return None,
            Some(Value::Array(items)) if items.len() <= max => items,
            Some(_) => {
                self.error(field, format!("must be a list of at most {max} ids"));
                return None;
            }
        };
        let mut out: Vec<String> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item
                .as_str()
                .and_then(|s| crate::ids::parse_uuid(s, field).ok())
            {
                Some(id) if out.contains(&id) => {
                    self.error(&format!("{field}[{i}]"), "is listed twice")
                }
                Some(id) => out.push(id),
                None => self.error(&format!("{field}[{i}]"), "must be an id"),
            }
        }
        Some(out)
    }

    /// An optional UUID (lowercased).
    pub fn opt_uuid(&mut self, field: &str) -> Option<String> {
        let raw = self.opt_str(field, 64)?;
        match crate::ids::parse_uuid(&raw, field) {
            Ok(id) => Some(id),
            Err(_) => {
                self.error(field, "must be an id");
                None
            }
        }
    }

    /// True when no error has been recorded so far.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }

    /// An optional amount of US dollars, zero or more (a decimal string, see
    /// [`crate::money::Usd::from_json`]).
    pub fn opt_usd(&mut self, field: &str) -> Option<crate::money::Usd> {
        let raw = self.opt_value(field).filter(|v| !v.is_null())?;
        match crate::money::Usd::from_json(&raw) {
            Ok(v) if v < crate::money::Usd::ZERO => {
                self.error(field, "must not be negative");
                None
            }
            Ok(v) => Some(v),
            Err(m) => {
                self.error(field, m);
                None
            }
        }
    }

    /// An optional RFC 3339 time.
    pub fn opt_time(&mut self, field: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        let raw = self.opt_str(field, 64)?;
        let t = crate::time::parse_rfc3339(&raw);
        if t.is_none() {
            self.error(field, "must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z");
        }
        t
    }

    /// A required [`Role`].
    pub fn role(&mut self, field: &str) -> Option<Role> {
        let raw = self.str(field, 16)?;
        let role = Role::parse(&raw);
        if role.is_none() {
            self.error(field, "must be one of owner, admin, member, viewer");
        }
        role
    }

    /// Ends the read: unknown fields and every recorded error make one `422`.
    pub fn finish(mut self) -> Result<(), ApiError> {
        let unknown: Vec<String> = self
            .map
            .keys()
            .filter(|k| !self.seen.contains(*k))
            .cloned()
            .collect();
        for field in unknown {
            self.error(&field, "unknown field");
        }
        if self.errors.is_empty() {
            return Ok(());
        }
        Err(ApiError::fields(self.errors))
    }
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(byte.ok_or_else(|| ApiError::field("body", "bad percent-encoding"))?);
                i += 2;
            }
            b'%' => return Err(ApiError::field("body", "bad percent-encoding")),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::field("body", "not UTF-8"))
}

/// An email address, lowercased: one `@`, a non-empty local part, a dotted domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let s = raw.trim().to_lowercase();
        let Some((local, domain)) = s.split_once('@') else {
            return Err("must be an email address");
        };
        let domain_ok = domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && domain
                .chars()
                .all(|c| c.is_alphanumeric() || c == '.' || c == '-');
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.chars().any(|c| c.is_whitespace() || c == '@');
        if local_ok && domain_ok && s.len() <= 254 {
            Ok(Self(s))
        } else {
            Err("must be an email address")
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password of 8..=128 characters.
pub fn check_password(p: &str) -> Result<(), &'static str> {
    match p.chars().count() {
        0..8 => Err("must be at least 8 characters"),
        8..=128 => Ok(()),
        _ => Err("must be at most 128 characters"),
    }
}

/// A project slug: 3..=64 of `a-z`, `0-9` and `-`, not starting or ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slug(String);

impl Slug {
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let ok = (3..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err("must be 3 to 64 of a-z, 0-9 and '-', not starting or ending with '-'")
        }
    }

    /// A slug made from a display name (`"My Agents!"` -> `"my-agents"`), padded to 3.
    pub fn from_name(name: &str) -> Self {
        let mut s = String::new();
        for c in name.to_lowercase().chars() {
            if c.is_ascii_alphanumeric() {
                s.push(c);
            } else if !s.ends_with('-') && !s.is_empty() {
                s.push('-');
            }
        }
        let mut s: String = s.trim_end_matches('-').chars().take(64).collect();
        s = s.trim_end_matches('-').to_string();
        while s.len() < 3 {
            s.push('x');
        }
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_nul_character_anywhere_is_refused_naming_its_field() {
        let cases = [
            (json!({"email": "a\u{0}b@example.com"}), "email"),
            (
                json!({"input": {"items": [1, {"name": "x\u{0}"}]}}),
                "input.items[1].name",
            ),
            (json!({"input": {"k\u{0}": 1}}), "input.k\\u0000"),
            (json!(["\u{0}"]), "body[0]"),
        ];
        for (body, field) in cases {
            assert_eq!(nul_field(&body, "").as_deref(), Some(field), "{body}");
            let bytes = serde_json::to_vec(&body).unwrap();
            let Err(ApiError::Validation { errors, .. }) = Body::parse(&bytes) else {
                panic!("{body} was accepted")
            };
            assert_eq!(errors[0].field, field);
        }
        assert_eq!(nul_field(&json!({"a": ["ok", {"b": "fine"}]}), ""), None);
        let Err(ApiError::Validation { errors, .. }) = Body::from_form(b"username=a%00b") else {
            panic!("a form with NUL was accepted")
        };
        assert_eq!(errors[0].field, "username");
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let mut b = Body::from_value(json!({"email": 5, "name": "", "extra": true})).unwrap();
        let _ = b.email("email");
        let _ = b.str("name", 10);
        let _ = b.str("password", 10);
        let ApiError::Validation { errors, .. } = b.finish().unwrap_err() else {
            panic!()
        };
        let fields: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.field.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("email", "must be a string"),
                ("name", "must not be empty"),
                ("password", "is required"),
                ("extra", "unknown field"),
            ]
        );
    }

    #[test]
    fn overlong_strings_are_rejected() {
        let mut b = Body::from_value(json!({"name": "x".repeat(11)})).unwrap();
        assert_eq!(b.str("name", 10), None);
        assert!(b.finish().is_err());
    }

    #[test]
    fn malformed_json_and_non_objects_are_422_on_body() {
        for bad in [&b"{"[..], b"[]", b"\"x\""] {
            let Err(ApiError::Validation { errors, .. }) = Body::parse(bad) else {
                panic!()
            };
            assert_eq!(errors[0].field, "body");
        }
    }

    #[test]
    fn a_form_body_decodes_percent_and_plus() {
        let mut b =
            Body::from_form(b"username=a%40b.co&password=p+w%21&grant_type=password").unwrap();
        assert_eq!(b.str("username", 100).as_deref(), Some("a@b.co"));
        assert_eq!(b.str("password", 100).as_deref(), Some("p w!"));
        assert!(Body::from_form(b"a=%zz").is_err());
        assert!(Body::from_form(b"a=%4").is_err());
    }

    #[test]
    fn emails_are_lowercased_and_checked() {
        assert_eq!(
            Email::parse(" Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "ada@ex..com",
            "a@b@c.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_8_to_128_characters() {
        assert!(check_password("1234567").is_err());
        assert!(check_password("12345678").is_ok());
        assert!(check_password(&"é".repeat(128)).is_ok());
        assert!(check_password(&"x".repeat(129)).is_err());
    }

    #[test]
    fn slugs_are_checked_and_made_from_names() {
        assert!(Slug::parse("my-project-1").is_ok());
        for bad in ["ab", "-abc", "abc-", "ABC", "a_b_c", &"a".repeat(65)] {
            assert!(Slug::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Slug::from_name("My  Agents!").as_str(), "my-agents");
        assert_eq!(Slug::from_name("!").as_str(), "xxx");
    }

    #[test]
    fn an_optional_body_may_be_empty_but_not_anything_else() {
        for empty in [&b""[..], b"  \n"] {
            let b = Body::parse_or_empty(empty).unwrap();
            assert!(b.finish().is_ok());
        }
        assert!(Body::parse_or_empty(b"[]").is_err());
        assert!(
            Body::parse_or_empty(b"{\"x\": 1}")
                .unwrap()
                .finish()
                .is_err(),
            "unknown field"
        );
    }
}
