//! `when` expressions: parsing and evaluating any text panics nowhere.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sparkops_core::expr;
use sparkops_core::template::Scope;
use sparkops_fuzz::{json, two_parts};

struct Input(Value);

impl Scope for Input {
    fn input(&self) -> &Value {
        &self.0
    }
    fn output(&self, _: &str) -> Option<&Value> {
        Some(&self.0)
    }
}

fuzz_target!(|data: &[u8]| {
    let (src, input) = two_parts(data);
    if let Ok(e) = expr::parse(&src) {
        let _ = e.eval(&Input(json(&input)));
        let _ = e.references();
    }
});
