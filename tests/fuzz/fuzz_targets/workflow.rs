//! Workflow definitions (DAGs of steps): validating and reading any JSON panics nowhere.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparkops_core::workflow::{self, Catalog};
use sparkops_fuzz::json;

fuzz_target!(|data: &[u8]| {
    let definition = json(&String::from_utf8_lossy(data));
    let _ = workflow::validate(&definition, &Catalog::default());
    let _ = workflow::parse_saved(&definition);
});
