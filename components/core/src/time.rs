//! Times in the API: RFC 3339 in UTC with millisecond precision.

use chrono::{DateTime, SecondsFormat, Utc};

/// `2026-11-25T04:10:05.123Z`.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An RFC 3339 time with any offset, as UTC.
pub fn parse_rfc3339(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_with_milliseconds() {
        let t = parse_rfc3339("2026-11-25T05:10:05.1234+01:00").unwrap();
        assert_eq!(rfc3339(t), "2026-11-25T04:10:05.123Z");
        assert!(parse_rfc3339("2026-11-25 04:10").is_none());
    }
}
