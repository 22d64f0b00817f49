//! Money: any text or JSON parses or is refused, and what parses round-trips its text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparkops_core::money::Usd;
use sparkops_fuzz::json;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(usd) = Usd::parse(&text) {
        assert_eq!(Usd::parse(&usd.to_fixed()).ok(), Some(usd));
    }
    let _ = Usd::from_json(&json(&text));
});
