//! Identifiers: UUIDv7 (time-ordered, so newest-first lists can page by id alone).

use crate::error::ApiError;

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A UUIDv7 from a Unix time in milliseconds and 10 random bytes (RFC 9562 section 5.7).
pub fn uuid_v7(unix_ms: u64, random: [u8; 10]) -> String {
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
    b[6..].copy_from_slice(&random);
    b[6] = 0x70 | (b[6] & 0x0f); // version 7
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

    #[test]
    fn a_v7_id_carries_its_time_version_and_variant() {
        let id = uuid_v7(0x0191_e7a2_1f6e, [0xff; 10]);
        assert_eq!(id, "0191e7a2-1f6e-7fff-bfff-ffffffffffff");
    }

    #[test]
    fn later_ids_sort_after_earlier_ones() {
        assert!(uuid_v7(1_700_000_000_001, [0; 10]) > uuid_v7(1_700_000_000_000, [0xff; 10]));
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
