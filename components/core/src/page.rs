//! Keyset pagination (API.md "Lists"): `limit` 1..=200 (default 50) and an opaque `cursor`;
//! items are newest first by UUIDv7 id, so the cursor is the last id seen and a page is
//! `where id < $cursor order by id desc limit $limit + 1`, stable under concurrent inserts.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::ApiError;
use crate::ids::parse_uuid;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

#[derive(Debug, Clone, PartialEq)]
pub struct PageRequest {
    pub limit: i64,
    /// Items strictly older than this id.
    pub before: Option<String>,
}

impl PageRequest {
    pub fn parse(limit: Option<&str>, cursor: Option<&str>) -> Result<Self, ApiError> {
        let limit = match limit {
            None => DEFAULT_LIMIT,
            Some(l) => match l.parse::<i64>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(ApiError::field(
                        "limit",
                        format!("must be an integer from 1 to {MAX_LIMIT}"),
                    ));
                }
            },
        };
        let before = match cursor {
            None | Some("") => None,
            Some(c) => Some(
                decode_cursor(c)
                    .ok_or_else(|| ApiError::field("cursor", "is not a cursor from this list"))?,
            ),
        };
        Ok(Self { limit, before })
    }

    /// From `limit + 1` fetched ids: the page's length and the next cursor, if any.
    pub fn finish(&self, fetched_ids: &[String]) -> (usize, Option<String>) {
        if fetched_ids.len() as i64 > self.limit {
            let n = self.limit as usize;
            (n, Some(encode_cursor(&fetched_ids[n - 1])))
        } else {
            (fetched_ids.len(), None)
        }
    }
}

pub fn encode_cursor(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

/// A cursor over an integer key (versions), opaque like the id cursors.
pub fn encode_int_cursor(n: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("n{n}"))
}

/// The integer an [`encode_int_cursor`] cursor holds.
pub fn decode_int_cursor(c: &str) -> Option<i64> {
    let bytes = URL_SAFE_NO_PAD.decode(c).ok()?;
    std::str::from_utf8(&bytes)
        .ok()?
        .strip_prefix('n')?
        .parse()
        .ok()
}

fn decode_cursor(c: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(c).ok()?;
    parse_uuid(std::str::from_utf8(&bytes).ok()?, "cursor").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0191e7a2-1f6e-7fff-bfff-ffffffffffff";

    #[test]
    fn limits_default_and_are_bounded() {
        assert_eq!(PageRequest::parse(None, None).unwrap().limit, 50);
        assert_eq!(PageRequest::parse(Some("200"), None).unwrap().limit, 200);
        for bad in ["0", "201", "-1", "x"] {
            assert!(PageRequest::parse(Some(bad), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cursor_round_trips_and_garbage_is_rejected() {
        let p = PageRequest::parse(None, Some(&encode_cursor(ID))).unwrap();
        assert_eq!(p.before.as_deref(), Some(ID));
        assert!(PageRequest::parse(None, Some("!!")).is_err());
        assert!(PageRequest::parse(None, Some(&encode_cursor("not-an-id"))).is_err());
        assert_eq!(decode_int_cursor(&encode_int_cursor(42)), Some(42));
        assert_eq!(decode_int_cursor(&encode_cursor(ID)), None);
    }

    #[test]
    fn a_full_page_points_at_its_last_item() {
        let p = PageRequest {
            limit: 2,
            before: None,
        };
        let ids: Vec<String> = ["c", "b", "a"].iter().map(|s| s.to_string()).collect();
        assert_eq!(p.finish(&ids), (2, Some(encode_cursor("b"))));
        assert_eq!(p.finish(&ids[..2]), (2, None));
    }
}
