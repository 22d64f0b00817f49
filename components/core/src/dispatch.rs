//! Handing a claimed step to the executor over HTTP.
//!
//! Spin allows local service chaining (`*.spin.internal`) only in an app whose every trigger
//! is HTTP: one component naming such a host makes the Redis and cron triggers refuse the
//! whole app. So every dispatch, from any trigger, goes to the app's own public endpoint
//! (`dispatch_url`, through the load balancer when there is one, which spreads steps over
//! replicas), and the executor's route is public. It runs a step only for a request signed
//! with the dispatch key: `x-sparkops-dispatch: t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>">`. The body names the run, step and lease, so a signature opens nothing
//! else, and an old one is refused after [`MAX_AGE_S`].

use hmac_sha256::HMAC;

use crate::ids::hex;

/// The header that carries a dispatch's signature.
pub const HEADER: &str = "x-sparkops-dispatch";
/// The path of the executor's route under `dispatch_url`.
pub const PATH: &str = "/internal/executor/steps";
/// How old (or how far ahead, for clock skew between replicas) a signature may be.
pub const MAX_AGE_S: i64 = 300;

/// The dispatch key, derived from the access-token key so an operator manages one secret
/// less; the label keeps it from ever equalling or verifying a token signature.
pub fn key(jwt_secret: &str) -> [u8; 32] {
    HMAC::mac(b"sparkops dispatch key v1", jwt_secret.as_bytes())
}

/// The header value for `body` sent at `now` (Unix seconds).
pub fn sign(key: &[u8; 32], now: i64, body: &[u8]) -> String {
    format!("t={now},v1={}", hex(&mac(key, now, body)))
}

/// Why a dispatch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No header, or not `t=...,v1=...`.
    Malformed,
    /// Signed too long ago (or too far ahead).
    Expired,
    /// The signature does not match the body.
    BadSignature,
}

/// Checks `header` against `body` at `now` (Unix seconds).
pub fn verify(key: &[u8; 32], header: Option<&str>, body: &[u8], now: i64) -> Result<(), Refusal> {
    let header = header.ok_or(Refusal::Malformed)?;
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = Some(value),
            _ => return Err(Refusal::Malformed),
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err(Refusal::Malformed);
    };
    if (now - t).abs() > MAX_AGE_S {
        return Err(Refusal::Expired);
    }
    let expected = hex(&mac(key, t, body));
    // Constant time: every byte is compared whatever the first difference.
    let same = expected.len() == v1.len()
        && expected
            .bytes()
            .zip(v1.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Refusal::BadSignature)
    }
}

fn mac(key: &[u8; 32], t: i64, body: &[u8]) -> [u8; 32] {
    let mut h = HMAC::new(key);
    h.update(t.to_string().as_bytes());
    h.update(b".");
    h.update(body);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"run_id":"r","step_key":"s","lease_id":"l"}"#;

    #[test]
    fn a_signed_body_verifies() {
        let k = key("secret");
        let header = sign(&k, 1_000, BODY);
        assert!(header.starts_with("t=1000,v1="));
        assert_eq!(verify(&k, Some(&header), BODY, 1_000), Ok(()));
        assert_eq!(verify(&k, Some(&header), BODY, 1_000 + MAX_AGE_S), Ok(()));
    }

    #[test]
    fn another_body_or_key_does_not_verify() {
        let k = key("secret");
        let header = sign(&k, 1_000, BODY);
        let other = br#"{"run_id":"r","step_key":"t","lease_id":"l"}"#;
        assert_eq!(
            verify(&k, Some(&header), other, 1_000),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify(&key("other"), Some(&header), BODY, 1_000),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn an_old_or_future_signature_is_expired() {
        let k = key("secret");
        let header = sign(&k, 1_000, BODY);
        assert_eq!(
            verify(&k, Some(&header), BODY, 1_001 + MAX_AGE_S),
            Err(Refusal::Expired)
        );
        assert_eq!(
            verify(&k, Some(&header), BODY, 999 - MAX_AGE_S),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn a_missing_or_malformed_header_is_refused() {
        let k = key("secret");
        for header in [
            None,
            Some(""),
            Some("v1=00"),
            Some("t=1000"),
            Some("t=x,v1=00"),
            Some("t=1000,v1=00,x=1"),
        ] {
            assert_eq!(
                verify(&k, header, BODY, 1_000),
                Err(Refusal::Malformed),
                "{header:?}"
            );
        }
        let short = format!("t=1000,v1={}", &sign(&k, 1_000, BODY)[10..40]);
        assert_eq!(
            verify(&k, Some(&short), BODY, 1_000),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn the_dispatch_key_is_not_the_token_key() {
        assert_ne!(key("secret").as_slice(), b"secret".as_slice());
        assert_ne!(key("secret"), key("secret2"));
    }
}
