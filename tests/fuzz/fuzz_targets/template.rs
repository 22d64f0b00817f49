//! Templates (`{{ input.x }}`, `{{ steps.k.output.y }}`, trigger documents): no input panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use sparkops_core::template;
use sparkops_fuzz::{Input, json, two_parts};

fuzz_target!(|data: &[u8]| {
    let (text, input) = two_parts(data);
    let (t, input) = (json(&text), json(&input));
    let _ = template::references(&t);
    let _ = template::render(&t, &Input(input.clone()));
    let doc = json!({"body": input, "headers": {"x": "y"}});
    let _ = template::render_document(&t, &doc, &["body", "headers"]);
    let _ = template::check_document(&t, &["body", "headers"]);
});
