//! Signed HTTP in both directions: outgoing webhooks signed as the Standard Webhooks
//! specification says, incoming triggers verified three ways, and approval links.
//!
//! **Standard Webhooks** (<https://www.standardwebhooks.com>): every attempt carries
//! `webhook-id` (the same on every attempt of one message, so receivers de-duplicate),
//! `webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature`: space-separated
//! `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, one per secret in use (two while a
//! rotated secret overlaps the new one). A secret is `whsec_` + base64 of its key bytes.
//!
//! **Triggers** verify a sender the same way, or GitHub's way (`X-Hub-Signature-256:
//! sha256=<hex HMAC-SHA256 of the body>`, the secret's text as the key), or by a bearer
//! secret.
//!
//! **Approval links** are `<base64url claims>.<base64url HMAC-SHA256>` under a key derived
//! from the token key: bound to one run, step, approver and decision, and an expiry.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac_sha256::HMAC;
use serde::{Deserialize, Serialize};

use crate::ids::hex;

/// The events a webhook may subscribe to.
pub const EVENT_TYPES: &[&str] = &[
    "run.succeeded",
    "run.failed",
    "run.timed_out",
    "run.cancelled",
    "step.waiting_approval",
    "budget.alert",
    "budget.held",
    "schedule.skipped",
    "schedule.refused",
];

/// The type of a delivery that `POST /webhooks/{id}/test` sends; not subscribable.
pub const TEST_EVENT: &str = "webhook.test";

/// The webhook event a run event is told as, if any: a run's end, an approval awaited, a
/// budget alert.
pub fn event_type_of(run_event: &str) -> Option<&'static str> {
    match run_event {
        "run.succeeded" => Some("run.succeeded"),
        "run.failed" => Some("run.failed"),
        "run.timed_out" => Some("run.timed_out"),
        "run.cancelled" => Some("run.cancelled"),
        "step.waiting" => Some("step.waiting_approval"),
        "budget.alert" => Some("budget.alert"),
        "step.held" => Some("budget.held"),
        _ => None,
    }
}

/// How old (or how far ahead) a signed timestamp may be.
pub const TOLERANCE_S: i64 = 300;

const SECRET_PREFIX: &str = "whsec_";

/// A new secret from 32 random bytes: `whsec_<base64>`.
pub fn new_secret(random: [u8; 32]) -> String {
    format!("{SECRET_PREFIX}{}", STANDARD.encode(random))
}

/// The key bytes of a Standard Webhooks secret (`whsec_` optional).
pub fn secret_key(secret: &str) -> Result<Vec<u8>, &'static str> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    match STANDARD.decode(encoded) {
        Ok(key) if (24..=64).contains(&key.len()) => Ok(key),
        Ok(_) => Err("must hold 24 to 64 bytes"),
        Err(_) => Err("must be whsec_ followed by base64"),
    }
}

/// One `v1,<base64>` signature of a message.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut h = HMAC::new(key);
    h.update(msg_id.as_bytes());
    h.update(b".");
    h.update(timestamp.to_string().as_bytes());
    h.update(b".");
    h.update(body);
    format!("v1,{}", STANDARD.encode(h.finalize()))
}

/// The `webhook-signature` value: one signature per key, space-separated.
pub fn signature_header(keys: &[Vec<u8>], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| sign(k, msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why an incoming signed request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A header is missing or does not parse.
    Malformed,
    /// The timestamp is outside [`TOLERANCE_S`].
    Expired,
    /// No signature matches.
    BadSignature,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Malformed => "the signature headers are missing or malformed",
            Refusal::Expired => "the signature's timestamp is too old or too far ahead",
            Refusal::BadSignature => "the signature does not match",
        }
    }
}

/// Verifies a Standard Webhooks request: any `v1` signature of `sig_header` made with `key`
/// over `id.timestamp.body`, with the timestamp within [`TOLERANCE_S`] of `now`.
pub fn verify(
    key: &[u8],
    id: Option<&str>,
    timestamp: Option<&str>,
    sig_header: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), Refusal> {
    let (Some(id), Some(timestamp), Some(sigs)) = (id, timestamp, sig_header) else {
        return Err(Refusal::Malformed);
    };
    let t: i64 = timestamp.trim().parse().map_err(|_| Refusal::Malformed)?;
    if (now - t).abs() > TOLERANCE_S {
        return Err(Refusal::Expired);
    }
    let expected = sign(key, id, t, body);
    if sigs
        .split(' ')
        .any(|s| s.starts_with("v1,") && same(s.as_bytes(), expected.as_bytes()))
    {
        Ok(())
    } else {
        Err(Refusal::BadSignature)
    }
}

/// Verifies GitHub's `X-Hub-Signature-256: sha256=<hex>` over the body.
pub fn verify_github(secret: &[u8], header: Option<&str>, body: &[u8]) -> Result<(), Refusal> {
    let given = header
        .and_then(|h| h.trim().strip_prefix("sha256="))
        .ok_or(Refusal::Malformed)?;
    let expected = hex(&HMAC::mac(body, secret));
    if same(given.to_ascii_lowercase().as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::BadSignature)
    }
}

/// Verifies `Authorization: Bearer <secret>`.
pub fn verify_bearer(secret: &str, header: Option<&str>) -> Result<(), Refusal> {
    let given = header
        .and_then(|h| h.trim().strip_prefix("Bearer "))
        .ok_or(Refusal::Malformed)?;
    // Compared as MACs, so the time taken says nothing about the secret or its length.
    let tag = |v: &str| HMAC::mac(v.as_bytes(), b"sparkops bearer compare");
    if same(&tag(given.trim()), &tag(secret)) {
        Ok(())
    } else {
        Err(Refusal::BadSignature)
    }
}

/// Constant time for equal lengths: every byte is compared whatever the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What an approval link decides, for whom and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkClaims {
    #[serde(rename = "r")]
    pub run_id: String,
    #[serde(rename = "s")]
    pub step_key: String,
    /// The approver (a user id of the step's `approvers`), or `None` for a step that names
    /// no approvers (anyone holding the link).
    #[serde(rename = "u")]
    pub approver: Option<String>,
    #[serde(rename = "a")]
    pub approve: bool,
    /// Unix seconds.
    #[serde(rename = "e")]
    pub expires: i64,
}

/// Why an approval link was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    Malformed,
    BadSignature,
    Expired,
}

/// The approval-link key, derived from the token key; the label keeps it from ever
/// verifying an access token or a dispatch.
pub fn link_key(jwt_secret: &str) -> [u8; 32] {
    HMAC::mac(b"sparkops approval link key v1", jwt_secret.as_bytes())
}

/// A signed link token for `claims`.
pub fn link_token(key: &[u8; 32], claims: &LinkClaims) -> String {
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let mac = URL_SAFE_NO_PAD.encode(HMAC::mac(body.as_bytes(), key));
    format!("{body}.{mac}")
}

/// The claims of a link token signed with `key` and not expired at `now`.
pub fn open_link(key: &[u8; 32], token: &str, now: i64) -> Result<LinkClaims, LinkRefusal> {
    let (body, mac) = token.split_once('.').ok_or(LinkRefusal::Malformed)?;
    let given = URL_SAFE_NO_PAD
        .decode(mac)
        .map_err(|_| LinkRefusal::Malformed)?;
    if !same(&given, &HMAC::mac(body.as_bytes(), key)) {
        return Err(LinkRefusal::BadSignature);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| LinkRefusal::Malformed)?;
    let claims: LinkClaims = serde_json::from_slice(&bytes).map_err(|_| LinkRefusal::Malformed)?;
    if now >= claims.expires {
        return Err(LinkRefusal::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference libraries.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_as_the_specification_s_example() {
        let key = secret_key(SPEC_SECRET).unwrap();
        assert_eq!(sign(&key, SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
        assert_eq!(
            verify(
                &key,
                Some(SPEC_ID),
                Some(&SPEC_TS.to_string()),
                Some(&format!("v1,bm90IGl0 {SPEC_SIG}")),
                SPEC_BODY,
                SPEC_TS + 10
            ),
            Ok(())
        );
    }

    #[test]
    fn another_body_id_or_key_or_an_old_timestamp_does_not_verify() {
        let key = secret_key(SPEC_SECRET).unwrap();
        let ts = SPEC_TS.to_string();
        let check = |id: &str, body: &[u8], key: &[u8], now: i64| {
            verify(key, Some(id), Some(&ts), Some(SPEC_SIG), body, now)
        };
        assert_eq!(
            check(SPEC_ID, b"{}", &key, SPEC_TS),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check("msg_other", SPEC_BODY, &key, SPEC_TS),
            Err(Refusal::BadSignature)
        );
        let other = secret_key(&new_secret([7; 32])).unwrap();
        assert_eq!(
            check(SPEC_ID, SPEC_BODY, &other, SPEC_TS),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check(SPEC_ID, SPEC_BODY, &key, SPEC_TS + TOLERANCE_S + 1),
            Err(Refusal::Expired)
        );
        assert_eq!(
            verify(&key, None, Some(&ts), Some(SPEC_SIG), SPEC_BODY, SPEC_TS),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            verify(
                &key,
                Some(SPEC_ID),
                Some("soon"),
                Some(SPEC_SIG),
                SPEC_BODY,
                SPEC_TS
            ),
            Err(Refusal::Malformed)
        );
    }

    #[test]
    fn two_keys_sign_twice_and_either_verifies() {
        let (a, b) = (
            secret_key(&new_secret([1; 32])).unwrap(),
            secret_key(&new_secret([2; 32])).unwrap(),
        );
        let header = signature_header(&[a.clone(), b.clone()], "msg_1", 100, b"x");
        assert_eq!(header.split(' ').count(), 2);
        for key in [&a, &b] {
            assert_eq!(
                verify(key, Some("msg_1"), Some("100"), Some(&header), b"x", 100),
                Ok(())
            );
        }
    }

    #[test]
    fn secrets_are_whsec_base64_of_enough_bytes() {
        let s = new_secret([9; 32]);
        assert!(s.starts_with("whsec_"));
        assert_eq!(secret_key(&s).unwrap(), vec![9; 32]);
        assert!(secret_key("whsec_c2hvcnQ=").is_err());
        assert!(secret_key("whsec_!!!").is_err());
    }

    #[test]
    fn github_signatures_are_hex_hmac_of_the_body() {
        // GitHub's documented example: secret "It's a Secret to Everybody", payload
        // "Hello, World!".
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let secret = b"It's a Secret to Everybody";
        assert_eq!(
            verify_github(secret, Some(header), b"Hello, World!"),
            Ok(())
        );
        assert_eq!(
            verify_github(secret, Some(header), b"Hello, World?"),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify_github(secret, Some("sha1=00"), b"x"),
            Err(Refusal::Malformed)
        );
    }

    #[test]
    fn bearer_secrets_compare_whole() {
        assert_eq!(verify_bearer("s3cret", Some("Bearer s3cret")), Ok(()));
        assert_eq!(
            verify_bearer("s3cret", Some("Bearer s3cre")),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify_bearer("s3cret", Some("s3cret")),
            Err(Refusal::Malformed)
        );
        assert_eq!(verify_bearer("s3cret", None), Err(Refusal::Malformed));
    }

    #[test]
    fn links_open_with_their_key_until_they_expire() {
        let key = link_key("a secret of at least thirty-two bytes!");
        let claims = LinkClaims {
            run_id: "r".into(),
            step_key: "ok".into(),
            approver: Some("u".into()),
            approve: true,
            expires: 1000,
        };
        let token = link_token(&key, &claims);
        assert_eq!(open_link(&key, &token, 999), Ok(claims.clone()));
        assert_eq!(open_link(&key, &token, 1000), Err(LinkRefusal::Expired));
        let other = link_key("another secret of at least thirty-two bytes");
        assert_eq!(open_link(&other, &token, 0), Err(LinkRefusal::BadSignature));
        // A token whose claims were changed (reject instead of approve) does not open.
        let forged = link_token(
            &other,
            &LinkClaims {
                approve: false,
                ..claims
            },
        );
        let (body, _) = forged.split_once('.').unwrap();
        let (_, mac) = token.split_once('.').unwrap();
        assert_eq!(
            open_link(&key, &format!("{body}.{mac}"), 0),
            Err(LinkRefusal::BadSignature)
        );
        assert_eq!(open_link(&key, "garbage", 0), Err(LinkRefusal::Malformed));
    }

    #[test]
    fn run_events_map_to_webhook_events() {
        assert_eq!(event_type_of("step.waiting"), Some("step.waiting_approval"));
        assert_eq!(event_type_of("step.held"), Some("budget.held"));
        assert_eq!(event_type_of("run.started"), None);
        for e in [
            "run.succeeded",
            "run.failed",
            "run.cancelled",
            "budget.alert",
        ] {
            assert_eq!(event_type_of(e), Some(e));
            assert!(EVENT_TYPES.contains(&e));
        }
    }
}
