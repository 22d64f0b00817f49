//! Schedules' cron maths: five fields (minute hour day-of-month month day-of-week) or six
//! (a leading seconds field), read in an IANA time zone with explicit DST rules (DESIGN.md
//! section 5): a local time skipped by a spring-forward gap fires once, at the first valid
//! instant after the gap; a local time repeated by a fall-back overlap fires once, at its
//! first occurrence.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;

/// A parsed cron expression with its time zone.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    seconds: Vec<u32>,
    minutes: Vec<u32>,
    hours: Vec<u32>,
    days: Vec<u32>,
    months: Vec<u32>,
    weekdays: Vec<u32>,
    /// Standard cron: when both day fields are restricted, either may match.
    days_restricted: bool,
    weekdays_restricted: bool,
    tz: Tz,
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// How far ahead a search looks before deciding an expression never fires (`30 2 30 2 *`).
const SEARCH_DAYS: i64 = 366 * 5;

fn value(s: &str, min: u32, max: u32, names: &[&str], offset: u32) -> Result<u32, String> {
    let upper = s.to_ascii_uppercase();
    if let Some(i) = names.iter().position(|n| *n == upper) {
        return Ok(i as u32 + offset);
    }
    let v: u32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(format!("`{v}` is outside {min}-{max}"))
    }
}

/// One field: `*`, `?`, `a`, `a-b`, with `/step`, comma-separated.
fn field(
    src: &str,
    min: u32,
    max: u32,
    names: &[&str],
    offset: u32,
) -> Result<(Vec<u32>, bool), String> {
    let mut out = Vec::new();
    let mut restricted = true;
    for part in src.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| format!("`{s}` is not a step"))?;
                if step == 0 {
                    return Err("a step of 0".into());
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = match range {
            "*" | "?" => {
                if step == 1 && src == range {
                    restricted = false;
                }
                (min, max)
            }
            r => match r.split_once('-') {
                Some((a, b)) => (
                    value(a, min, max, names, offset)?,
                    value(b, min, max, names, offset)?,
                ),
                None => {
                    let v = value(r, min, max, names, offset)?;
                    (v, if step > 1 { max } else { v })
                }
            },
        };
        if lo > hi {
            return Err(format!("`{range}` runs backwards"));
        }
        out.extend((lo..=hi).step_by(step as usize));
    }
    out.sort_unstable();
    out.dedup();
    Ok((out, restricted))
}

impl Schedule {
    /// Parses `expr` (5 or 6 fields) for the IANA zone `tz`.
    pub fn parse(expr: &str, tz: &str) -> Result<Self, String> {
        let tz: Tz = tz
            .parse()
            .map_err(|_| format!("`{tz}` is not an IANA time zone"))?;
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let (sec, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => return Err(format!("a cron expression has 5 or 6 fields, not {n}")),
        };
        let named = |name: &str, r: Result<(Vec<u32>, bool), String>| {
            r.map_err(|e| format!("{name} field: {e}"))
        };
        let (seconds, _) = named("seconds", field(sec, 0, 59, &[], 0))?;
        let (minutes, _) = named("minute", field(rest[0], 0, 59, &[], 0))?;
        let (hours, _) = named("hour", field(rest[1], 0, 23, &[], 0))?;
        let (days, days_restricted) = named("day-of-month", field(rest[2], 1, 31, &[], 0))?;
        let (months, _) = named("month", field(rest[3], 1, 12, &MONTHS, 1))?;
        let (mut weekdays, weekdays_restricted) =
            named("day-of-week", field(rest[4], 0, 7, &DAYS, 0))?;
        // 7 is Sunday too.
        if weekdays.contains(&7) {
            weekdays.retain(|d| *d != 7);
            if !weekdays.contains(&0) {
                weekdays.insert(0, 0);
            }
        }
        Ok(Self {
            seconds,
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_restricted,
            weekdays_restricted,
            tz,
        })
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        if !self.months.contains(&d.month()) {
            return false;
        }
        let dom = self.days.contains(&d.day());
        let dow = self.weekdays.contains(&d.weekday().num_days_from_sunday());
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            _ => dom && dow,
        }
    }

    /// The instant a local time maps to under the DST rules, if it fires at all.
    fn resolve(&self, local: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            // Repeated by a fall-back: the first occurrence only.
            LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
            // Skipped by a spring-forward: the first valid instant after the gap.
            LocalResult::None => {
                let mut probe = local;
                for _ in 0..(24 * 60) {
                    probe += Duration::minutes(1);
                    let probe_min = probe.with_second(0)?;
                    if let Some(t) = self.tz.from_local_datetime(&probe_min).earliest() {
                        return Some(t.with_timezone(&Utc));
                    }
                }
                None
            }
        }
    }

    /// `t` as a local time of the schedule's zone, with its offset (RFC 3339).
    pub fn local(&self, t: DateTime<Utc>) -> String {
        t.with_timezone(&self.tz)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
    }

    /// The first fire time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // A gap can move a local time up to a few hours later, so start a day early.
        let after_local = after.with_timezone(&self.tz).naive_local();
        let start = after_local.date() - Duration::days(1);
        // A local time this far before `after`'s cannot resolve to an instant after it
        // (offsets change by at most a couple of hours), so whole hours and minutes before
        // it are skipped without asking the zone: an every-second cron stays cheap.
        let floor = after_local - Duration::hours(3);
        for offset in 0..SEARCH_DAYS {
            let day = start + Duration::days(offset);
            if !self.day_matches(day) || day.and_hms_opt(23, 59, 59)? < floor {
                continue;
            }
            for &h in &self.hours {
                if day.and_hms_opt(h, 59, 59)? < floor {
                    continue;
                }
                for &m in &self.minutes {
                    if day.and_hms_opt(h, m, 59)? < floor {
                        continue;
                    }
                    for &s in &self.seconds {
                        let local = day.and_hms_opt(h, m, s)?;
                        if local < floor {
                            continue;
                        }
                        if let Some(t) = self.resolve(local)
                            && t > after
                        {
                            return Some(t);
                        }
                    }
                }
            }
        }
        None
    }

    /// The next `count` fire times after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(count);
        let mut t = after;
        while out.len() < count {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn times(expr: &str, tz: &str, after: &str, n: usize) -> Vec<String> {
        Schedule::parse(expr, tz)
            .unwrap()
            .upcoming(utc(after), n)
            .iter()
            .map(|t| crate::time::rfc3339(*t))
            .collect()
    }

    #[test]
    fn five_and_six_fields_parse_and_fire() {
        assert_eq!(
            times("*/15 * * * *", "UTC", "2026-01-01T00:07:00Z", 2),
            ["2026-01-01T00:15:00.000Z", "2026-01-01T00:30:00.000Z"]
        );
        assert_eq!(
            times("30 0 9 * * MON-FRI", "UTC", "2026-01-02T10:00:00Z", 2),
            ["2026-01-05T09:00:30.000Z", "2026-01-06T09:00:30.000Z"]
        );
        assert_eq!(
            times("0 0 1 jan,jul *", "UTC", "2026-03-01T00:00:00Z", 1),
            ["2026-07-01T00:00:00.000Z"]
        );
        assert_eq!(
            times("0 12 * * 7", "UTC", "2026-01-01T00:00:00Z", 1),
            ["2026-01-04T12:00:00.000Z"]
        );
    }

    #[test]
    fn day_of_month_and_day_of_week_combine_with_or_when_both_are_set() {
        // The 13th or any Friday.
        assert_eq!(
            times("0 0 13 * FRI", "UTC", "2026-02-01T00:00:00Z", 3),
            [
                "2026-02-06T00:00:00.000Z",
                "2026-02-13T00:00:00.000Z",
                "2026-02-20T00:00:00.000Z"
            ]
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_rejected() {
        for (expr, tz) in [
            ("* * * *", "UTC"),
            ("* * * * * * *", "UTC"),
            ("60 * * * *", "UTC"),
            ("* 24 * * *", "UTC"),
            ("*/0 * * * *", "UTC"),
            ("5-1 * * * *", "UTC"),
            ("* * * FOO *", "UTC"),
            ("* * * * *", "Mars/Olympus"),
        ] {
            assert!(Schedule::parse(expr, tz).is_err(), "{expr} {tz}");
        }
    }

    #[test]
    fn a_time_skipped_by_spring_forward_fires_once_after_the_gap() {
        // New York, 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00Z).
        assert_eq!(
            times("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", 2),
            ["2026-03-08T07:00:00.000Z", "2026-03-09T06:30:00.000Z"]
        );
        // Every minute through the gap: 01:59 EST, then once at 03:00 EDT, then 03:01.
        assert_eq!(
            times("* * * * *", "America/New_York", "2026-03-08T06:58:30Z", 3),
            [
                "2026-03-08T06:59:00.000Z",
                "2026-03-08T07:00:00.000Z",
                "2026-03-08T07:01:00.000Z"
            ]
        );
        // Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00Z).
        assert_eq!(
            times("15 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T01:00:00.000Z", "2026-03-30T00:15:00.000Z"]
        );
    }

    #[test]
    fn a_time_repeated_by_fall_back_fires_once() {
        // New York, 2026-11-01: 01:00-01:59 happens twice (EDT, then EST).
        assert_eq!(
            times("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T05:30:00.000Z", "2026-11-02T06:30:00.000Z"]
        );
        // Berlin, 2026-10-25: 02:00-02:59 happens twice (CEST, then CET).
        assert_eq!(
            times("0 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T00:00:00.000Z", "2026-10-26T01:00:00.000Z"]
        );
        // Hourly through the repeat: 01:00 EDT, then 02:00 EST; the second 01:00 is skipped.
        assert_eq!(
            times("0 * * * *", "America/New_York", "2026-11-01T04:30:00Z", 2),
            ["2026-11-01T05:00:00.000Z", "2026-11-01T07:00:00.000Z"]
        );
    }

    #[test]
    fn an_impossible_date_never_fires() {
        assert_eq!(
            Schedule::parse("0 0 30 2 *", "UTC")
                .unwrap()
                .next_after(utc("2026-01-01T00:00:00Z")),
            None
        );
    }

    #[test]
    fn an_every_second_cron_lists_a_hundred_fire_times_in_order() {
        let s = Schedule::parse("* * * * * *", "Europe/Berlin").unwrap();
        let after = utc("2026-06-01T21:59:58Z");
        let times = s.upcoming(after, 100);
        assert_eq!(times.len(), 100);
        // Across local midnight, where a day-by-day search starts a new day.
        assert_eq!(times[0], utc("2026-06-01T21:59:59Z"));
        for pair in times.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::seconds(1));
        }
    }
}
