//! `when` expressions: parsing and evaluating any text panics nowhere.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparkops_core::expr;
use sparkops_fuzz::{Input, json, two_parts};

fuzz_target!(|data: &[u8]| {
    let (src, input) = two_parts(data);
    if let Ok(e) = expr::parse(&src) {
        let _ = e.eval(&Input(json(&input)));
        let _ = e.references();
    }
});
