//! JSON merge patch and If-Match: no panic, and a patch applied twice is applied once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparkops_core::patch::{IfMatch, merge};
use sparkops_fuzz::{json, two_parts};

fuzz_target!(|data: &[u8]| {
    let (target, patch) = two_parts(data);
    let _ = IfMatch::parse(&target);
    let (mut once, patch) = (json(&target), json(&patch));
    merge(&mut once, &patch);
    let mut twice = once.clone();
    merge(&mut twice, &patch);
    assert_eq!(once, twice);
});
