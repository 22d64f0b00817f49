//! What the fuzz targets share: splitting one input into the parts a parser takes.

use serde_json::Value;
use sparkops_core::template::Scope;

/// A run's scope in which the input and every step's output are one value.
pub struct Input(pub Value);

impl Scope for Input {
    fn input(&self) -> &Value {
        &self.0
    }
    fn output(&self, _: &str) -> Option<&Value> {
        Some(&self.0)
    }
}

/// The input's text up to the first NUL and after it (a parser's two inputs).
pub fn two_parts(data: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(data);
    match text.split_once('\0') {
        Some((a, b)) => (a.to_string(), b.to_string()),
        None => (text.into_owned(), String::new()),
    }
}

/// A JSON value read from `text`, or the text itself as a JSON string.
pub fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}
