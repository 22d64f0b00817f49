//! Identifiers: UUIDv7 (time-ordered, so newest-first lists can page by id alone).

use crate::error::ApiError;

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A UUIDv7 from a Unix time in nanoseconds and 8 random bytes (RFC 9562 section 5.7):
/// the milliseconds in `unix_ts_ms`, and the fraction of the millisecond in `rand_a`'s 12
/// bits (section 6.2, method 3: steps of 1/4096 ms, about 244 ns). So ids made one after
/// the other sort in the order they were made, though instances share no counter: two
/// requests, one after the other, in the same millisecond still get ids in their order,
/// and a list "newest first" by id is.
pub fn uuid_v7(unix_nanos: u64, random: [u8; 8]) -> String {
    let (unix_ms, sub_ms) = (unix_nanos / 1_000_000, unix_nanos % 1_000_000);
    let fraction = (sub_ms * 4096 / 1_000_000) as u16;
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
    b[6..8].copy_from_slice(&(0x7000 | fraction).to_be_bytes()); // version 7, then rand_a
    b[8..].copy_from_slice(&random);
    b[8] = 0x80 | (b[8] & 0x3f); // variant 10
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Checks a UUID path or body value, normalised to lowercase; `what` names it in errors.
pub fn parse_uuid(value: &str, what: &str) -> Result<String, ApiError> {
    let ok = value.len() == 36
        && value.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(ApiError::NotFound(format!("no {what} {value:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_v7_id_carries_its_time_version_and_variant() {
        let id = uuid_v7(0x0191_e7a2_1f6e * MS, [0xff; 8]);
        assert_eq!(id, "0191e7a2-1f6e-7000-bfff-ffffffffffff");
        // Half a millisecond on: 2048/4096 in `rand_a`; the last step of a millisecond.
        let id = uuid_v7(0x0191_e7a2_1f6e * MS + MS / 2, [0; 8]);
        assert_eq!(id, "0191e7a2-1f6e-7800-8000-000000000000");
        assert!(uuid_v7(0x0191_e7a2_1f6e * MS + MS - 1, [0; 8]).starts_with("0191e7a2-1f6e-7fff-"));
    }

    #[test]
    fn later_ids_sort_after_earlier_ones() {
        let t = 1_700_000_000_000 * MS;
        assert!(uuid_v7(t + MS, [0; 8]) > uuid_v7(t, [0xff; 8]));
        // Within one millisecond, a quarter of a microsecond apart: still in order,
        // whatever their random bytes.
        assert!(uuid_v7(t + 300, [0; 8]) > uuid_v7(t, [0xff; 8]));
        assert!(uuid_v7(t + 250_000, [0; 8]) > uuid_v7(t + 249_700, [0xff; 8]));
    }

    #[test]
    fn malformed_ids_are_not_found() {
        assert!(parse_uuid("0191E7A2-1F6E-7FFF-BFFF-FFFFFFFFFFFF", "project").is_ok());
        for bad in [
            "",
            "x",
            "0191e7a2-1f6e-7fff-bfff-fffffffffff",
            "0191e7a2x1f6e-7fff-bfff-ffffffffffff",
        ] {
            assert!(
                matches!(parse_uuid(bad, "project"), Err(ApiError::NotFound(_))),
                "{bad}"
            );
        }
    }
}
