//! HTTP tool definitions: header values are literals or references to project secrets
//! (`{{ secret.NAME }}`), stored as written and resolved only at call time.

use serde_json::{Map, Value};

/// Headers whose values are credentials: a literal value would be stored and answered in
/// clear, so these must reference a secret.
const CREDENTIAL_HEADERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "x-auth-token",
];

/// Headers the runtime sets itself.
const RESERVED_HEADERS: [&str; 6] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "idempotency-key",
    "upgrade",
];

/// A project secret's name: a letter, then up to 127 of letters, digits, `_`, `.`, `-`.
pub fn check_secret_name(name: &str) -> Result<(), &'static str> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic());
    if first_ok
        && name.len() <= 128
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        Ok(())
    } else {
        Err("must start with a letter and hold at most 128 letters, digits, '_', '.' or '-'")
    }
}

/// The secret a header value names, when it is exactly `{{ secret.NAME }}`.
pub fn secret_reference(value: &str) -> Option<&str> {
    let inner = value.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim();
    let name = inner.strip_prefix("secret.")?;
    check_secret_name(name).ok().map(|_| name)
}

/// Checks configured headers (a tool's, an MCP server's), the object at field path `at`:
/// each problem as `(field path, message)`.
pub fn check_headers(headers: &Map<String, Value>, at: &str) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if headers.len() > 50 {
        problems.push((at.into(), "must have at most 50 headers".into()));
    }
    for (name, value) in headers {
        let field = format!("{at}.{name}");
        let lower = name.to_ascii_lowercase();
        let token = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            problems.push((field, "is not a valid header name".into()));
            continue;
        }
        if RESERVED_HEADERS.contains(&lower.as_str()) {
            problems.push((field, "is set by Spark-Ops and cannot be configured".into()));
            continue;
        }
        let Some(value) = value.as_str() else {
            problems.push((field, "must be a string".into()));
            continue;
        };
        let printable = value.len() <= 8192
            && value
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
        if !printable {
            problems.push((
                field,
                "must be at most 8192 printable ASCII characters".into(),
            ));
        } else if value.contains("{{") && secret_reference(value).is_none() {
            problems.push((
                field,
                "a reference must be exactly {{ secret.NAME }}".into(),
            ));
        } else if CREDENTIAL_HEADERS.contains(&lower.as_str()) && secret_reference(value).is_none()
        {
            problems.push((
                field,
                "carries a credential: store it as a project secret and write {{ secret.NAME }}"
                    .into(),
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(v: Value) -> Vec<String> {
        check_headers(v.as_object().unwrap(), "http.headers")
            .into_iter()
            .map(|(f, m)| format!("{f}: {m}"))
            .collect()
    }

    #[test]
    fn references_name_exactly_one_secret() {
        assert_eq!(
            secret_reference("{{ secret.WEATHER_KEY }}"),
            Some("WEATHER_KEY")
        );
        assert_eq!(
            secret_reference("{{secret.provider.openai.api_key}}"),
            Some("provider.openai.api_key")
        );
        for bad in [
            "{{ input.x }}",
            "Bearer {{ secret.K }}",
            "{{ secret. }}",
            "{{ secret.1x }}",
            "secret.K",
        ] {
            assert_eq!(secret_reference(bad), None, "{bad}");
        }
    }

    #[test]
    fn literal_credentials_and_malformed_headers_are_refused() {
        assert!(
            problems(json!({"Authorization": "{{ secret.TOKEN }}", "Accept": "application/json"}))
                .is_empty()
        );
        assert_eq!(
            problems(json!({
                "Authorization": "Bearer abc",
                "Bad Name": "x",
                "Host": "example.com",
                "X-Mixed": "Bearer {{ secret.T }}",
                "X-Num": 3
            })),
            [
                "http.headers.Authorization: carries a credential: store it as a project secret and write {{ secret.NAME }}",
                "http.headers.Bad Name: is not a valid header name",
                "http.headers.Host: is set by Spark-Ops and cannot be configured",
                "http.headers.X-Mixed: a reference must be exactly {{ secret.NAME }}",
                "http.headers.X-Num: must be a string",
            ]
        );
    }

    #[test]
    fn secret_names_are_checked() {
        assert!(check_secret_name("provider.openai.api_key").is_ok());
        for bad in ["", "1abc", "a b", &"a".repeat(129), "a/b"] {
            assert!(check_secret_name(bad).is_err(), "{bad}");
        }
    }
}
