//! JSON Schema checks: any schema is checked without a panic, and one that passes the check
//! validates any instance without one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparkops_core::schema;
use sparkops_fuzz::{json, two_parts};

fuzz_target!(|data: &[u8]| {
    let (s, instance) = two_parts(data);
    let s = json(&s);
    if schema::check(&s).is_ok() {
        let _ = schema::validate(&s, &json(&instance));
    }
    let _ = schema::check_object(&s);
});
