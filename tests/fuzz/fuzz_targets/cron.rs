//! Cron expressions with time zones: parsing panics nowhere, and a schedule that parses
//! answers its next fire times, in order and after the start.
#![no_main]

use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use sparkops_core::cron::Schedule;
use sparkops_fuzz::two_parts;

fuzz_target!(|data: &[u8]| {
    let (expr, zone) = two_parts(data);
    if let Ok(schedule) = Schedule::parse(&expr, &zone) {
        let start = Utc.with_ymd_and_hms(2026, 3, 29, 0, 30, 0).unwrap();
        let times = schedule.upcoming(start, 3);
        assert!(times.iter().all(|t| *t > start));
        assert!(times.windows(2).all(|w| w[0] < w[1]));
    }
});
