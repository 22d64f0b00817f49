//! Fixed-window rate limits: an atomic counter per key and window (in Redis), turned into a
//! decision and the `RateLimit-*` headers here.

use crate::error::ApiError;

/// A limit: `limit` requests per `window_secs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub limit: u64,
    pub window_secs: u64,
}

/// The outcome of counting one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the window resets.
    pub reset_secs: u64,
}

impl Limit {
    /// Decides from the window's count after this request and the counter's time to live.
    pub fn decide(self, count: u64, ttl_secs: i64) -> Decision {
        let reset_secs = if ttl_secs > 0 {
            ttl_secs as u64
        } else {
            self.window_secs
        };
        Decision {
            allowed: count <= self.limit,
            limit: self.limit,
            remaining: self.limit.saturating_sub(count),
            reset_secs,
        }
    }
}

impl Decision {
    /// The `RateLimit-*` headers (draft-ietf-httpapi-ratelimit-headers).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ratelimit-limit", self.limit.to_string()),
            ("ratelimit-remaining", self.remaining.to_string()),
            ("ratelimit-reset", self.reset_secs.to_string()),
        ]
    }

    /// `Ok` when allowed, else the `429`.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.allowed {
            Ok(())
        } else {
            Err(ApiError::RateLimited {
                retry_after_secs: self.reset_secs.max(1),
            })
        }
    }

    /// Of two decisions, the one that binds tighter (for the response headers).
    pub fn tighter(self, other: Decision) -> Decision {
        match (self.allowed, other.allowed) {
            (true, false) => other,
            (false, true) => self,
            _ if other.remaining < self.remaining => other,
            _ => self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_past_the_limit_is_refused_with_retry_after() {
        let l = Limit {
            limit: 2,
            window_secs: 60,
        };
        assert!(l.decide(2, 40).allowed);
        let d = l.decide(3, 40);
        assert_eq!(
            d,
            Decision {
                allowed: false,
                limit: 2,
                remaining: 0,
                reset_secs: 40
            }
        );
        assert_eq!(
            d.check(),
            Err(ApiError::RateLimited {
                retry_after_secs: 40
            })
        );
    }

    #[test]
    fn a_counter_without_ttl_resets_after_a_full_window() {
        assert_eq!(
            Limit {
                limit: 5,
                window_secs: 60
            }
            .decide(1, -1)
            .reset_secs,
            60
        );
    }

    #[test]
    fn the_tighter_decision_wins() {
        let l = Limit {
            limit: 10,
            window_secs: 60,
        };
        assert_eq!(l.decide(3, 5).tighter(l.decide(8, 5)).remaining, 2);
        assert!(!l.decide(3, 5).tighter(l.decide(11, 5)).allowed);
    }
}
