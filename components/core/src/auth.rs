//! Credentials: access JWTs (HS256 under a secret variable), Argon2id password hashes,
//! opaque refresh tokens and API keys (stored only as SHA-256 hashes).
//!
//! Every function takes the time and the randomness it needs as arguments, so the rules
//! (expiry, audience, formats) are tested here without a clock or an RNG.

use std::collections::HashSet;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jwt_simple::prelude::{
    Claims, Duration, HS256Key, MACLike, NoCustomClaims, UnixTimeStamp, VerificationOptions,
};
use sha2::{Digest, Sha256};

/// `iss` of every access token.
pub const ISSUER: &str = "sparkops";
/// `aud` of every access token: the API.
pub const AUDIENCE: &str = "sparkops-api";
/// Access tokens live 15 minutes; refresh tokens carry the session.
pub const ACCESS_TTL_SECS: u64 = 15 * 60;
/// Refresh tokens expire after 30 days unused.
pub const REFRESH_TTL_SECS: i64 = 30 * 24 * 3600;
/// Clock skew tolerated when checking `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

/// Signs and checks access tokens.
pub struct TokenKey(HS256Key);

/// The checked claims of an access token.
#[derive(Debug, PartialEq)]
pub struct AccessClaims {
    pub user_id: String,
    pub token_id: String,
}

#[derive(Debug, PartialEq)]
pub enum TokenError {
    /// The key is too short to be a secret.
    WeakKey,
    Invalid,
}

impl TokenKey {
    /// A key from the `jwt_secret` variable: at least 32 bytes.
    pub fn new(secret: &[u8]) -> Result<Self, TokenError> {
        if secret.len() < 32 {
            return Err(TokenError::WeakKey);
        }
        Ok(Self(HS256Key::from_bytes(secret)))
    }

    /// An access token for `user_id`, issued at `now` (Unix seconds), id `token_id`.
    pub fn issue(&self, user_id: &str, token_id: &str, now: u64) -> String {
        let mut claims = Claims::create(Duration::from_secs(ACCESS_TTL_SECS))
            .with_issuer(ISSUER)
            .with_audience(AUDIENCE)
            .with_subject(user_id)
            .with_jwt_id(token_id);
        claims.issued_at = Some(UnixTimeStamp::from_secs(now));
        claims.invalid_before = Some(UnixTimeStamp::from_secs(now));
        claims.expires_at = Some(UnixTimeStamp::from_secs(now + ACCESS_TTL_SECS));
        self.0
            .authenticate(claims)
            .expect("HS256 signing cannot fail")
    }

    /// Checks signature, algorithm (HS256 only: `none` and others are refused), issuer,
    /// audience, expiry and not-before at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<AccessClaims, TokenError> {
        let options = VerificationOptions {
            allowed_issuers: Some(HashSet::from([ISSUER.to_string()])),
            allowed_audiences: Some(HashSet::from([AUDIENCE.to_string()])),
            time_tolerance: Some(Duration::from_secs(LEEWAY_SECS)),
            artificial_time: Some(UnixTimeStamp::from_secs(now)),
            ..Default::default()
        };
        let claims = self
            .0
            .verify_token::<NoCustomClaims>(token, Some(options))
            .map_err(|_| TokenError::Invalid)?;
        // A token must say when it ends.
        if claims.expires_at.is_none() {
            return Err(TokenError::Invalid);
        }
        match (claims.subject, claims.jwt_id) {
            (Some(user_id), Some(token_id)) => Ok(AccessClaims { user_id, token_id }),
            _ => Err(TokenError::Invalid),
        }
    }
}

fn argon2() -> Argon2<'static> {
    // OWASP's Argon2id baseline: 19 MiB, 2 passes, 1 lane.
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid Argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The Argon2id PHC string for `password` with a 16-byte `salt`.
pub fn hash_password(password: &str, salt: &[u8; 16]) -> String {
    let salt = SaltString::encode_b64(salt).expect("16 bytes is a valid salt");
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .expect("Argon2 hashing cannot fail with valid parameters")
        .to_string()
}

/// Whether `password` matches a stored PHC string.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|hash| argon2().verify_password(password.as_bytes(), &hash).is_ok())
        .unwrap_or(false)
}

/// A hash that matches no password, verified when an email is unknown so that a login for
/// a missing account costs the same as one for an existing account.
pub const DUMMY_PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c3BhcmtvcHNkdW1teXNhbHQ$Y5rvx0nLBB3mw0vkJEJ0CvwTWtkvKh8SywqZ8QC4n8w";

/// SHA-256 of a token, hex: how refresh tokens and API keys are stored.
pub fn token_hash(token: &str) -> String {
    crate::ids::hex(&Sha256::digest(token.as_bytes()))
}

/// An opaque refresh token from 32 random bytes.
pub fn refresh_token(random: &[u8; 32]) -> String {
    format!("rt_{}", URL_SAFE_NO_PAD.encode(random))
}

/// A new API key: the secret (shown once) and its display prefix.
pub struct NewApiKey {
    pub secret: String,
    pub prefix: String,
}

/// Length of the stored, displayed prefix: `sk_` and 8 characters.
const API_KEY_PREFIX_LEN: usize = 11;

/// An API key `sk_<43 characters>` from 32 random bytes.
pub fn api_key(random: &[u8; 32]) -> NewApiKey {
    let secret = format!("sk_{}", URL_SAFE_NO_PAD.encode(random));
    let prefix = secret[..API_KEY_PREFIX_LEN].to_string();
    NewApiKey { secret, prefix }
}

/// The stored prefix of something that looks like an API key.
pub fn api_key_prefix(secret: &str) -> Option<&str> {
    (secret.starts_with("sk_") && secret.len() == 46 && secret.is_ascii())
        .then(|| &secret[..API_KEY_PREFIX_LEN])
}

/// Compares two hashes in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

    const NOW: u64 = 1_800_000_000;

    fn key() -> TokenKey {
        TokenKey::new(&[7u8; 32]).unwrap()
    }

    #[test]
    fn a_fresh_token_verifies_to_its_user() {
        let token = key().issue("user-1", "jti-1", NOW);
        let claims = key().verify(&token, NOW + 10).unwrap();
        assert_eq!(
            claims,
            AccessClaims {
                user_id: "user-1".into(),
                token_id: "jti-1".into()
            }
        );
    }

    #[test]
    fn an_expired_or_not_yet_valid_token_is_rejected() {
        let token = key().issue("u", "j", NOW);
        assert!(key().verify(&token, NOW + ACCESS_TTL_SECS - 1).is_ok());
        assert_eq!(
            key().verify(&token, NOW + ACCESS_TTL_SECS + LEEWAY_SECS + 1),
            Err(TokenError::Invalid)
        );
        assert_eq!(
            key().verify(&token, NOW - LEEWAY_SECS - 1),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn a_token_signed_with_another_key_is_rejected() {
        let other = TokenKey::new(&[8u8; 32]).unwrap().issue("u", "j", NOW);
        assert_eq!(key().verify(&other, NOW), Err(TokenError::Invalid));
    }

    #[test]
    fn a_flipped_signature_byte_is_rejected() {
        let token = key().issue("u", "j", NOW);
        let (head, sig) = token.rsplit_once('.').unwrap();
        let mut bytes = B64.decode(sig).unwrap();
        bytes[0] ^= 1;
        let tampered = format!("{head}.{}", B64.encode(bytes));
        assert_eq!(key().verify(&tampered, NOW), Err(TokenError::Invalid));
    }

    fn forged(header: &str, sig: &str) -> String {
        let token = key().issue("u", "j", NOW);
        let payload = token.split('.').nth(1).unwrap();
        format!("{}.{payload}.{sig}", B64.encode(header))
    }

    #[test]
    fn alg_none_and_other_algorithms_are_rejected() {
        assert_eq!(
            key().verify(&forged(r#"{"alg":"none","typ":"JWT"}"#, ""), NOW),
            Err(TokenError::Invalid)
        );
        let token = key().issue("u", "j", NOW);
        let real_sig = token.rsplit('.').next().unwrap();
        for alg in ["HS384", "HS512", "EdDSA", "RS256", "ES256"] {
            let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
            assert_eq!(
                key().verify(&forged(&header, real_sig), NOW),
                Err(TokenError::Invalid),
                "{alg}"
            );
        }
    }

    #[test]
    fn a_token_for_another_audience_or_issuer_is_rejected() {
        let mut claims = Claims::create(Duration::from_secs(60))
            .with_subject("u")
            .with_jwt_id("j");
        claims.issued_at = Some(UnixTimeStamp::from_secs(NOW));
        claims.expires_at = Some(UnixTimeStamp::from_secs(NOW + 60));
        let raw = HS256Key::from_bytes(&[7u8; 32]);
        let other_aud = raw
            .authenticate(claims.clone().with_issuer(ISSUER).with_audience("billing"))
            .unwrap();
        let other_iss = raw
            .authenticate(claims.clone().with_issuer("evil").with_audience(AUDIENCE))
            .unwrap();
        let right = raw
            .authenticate(claims.with_issuer(ISSUER).with_audience(AUDIENCE))
            .unwrap();
        assert_eq!(key().verify(&other_aud, NOW), Err(TokenError::Invalid));
        assert_eq!(key().verify(&other_iss, NOW), Err(TokenError::Invalid));
        assert!(key().verify(&right, NOW).is_ok());
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert!(matches!(TokenKey::new(b"short"), Err(TokenError::WeakKey)));
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let phc = hash_password("correct horse", &[1; 16]);
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("wrong horse", &phc));
        assert!(!verify_password("anything", "not a hash"));
    }

    #[test]
    fn the_dummy_hash_is_well_formed_and_matches_nothing() {
        assert!(PasswordHash::new(DUMMY_PASSWORD_HASH).is_ok());
        assert!(!verify_password("", DUMMY_PASSWORD_HASH));
        assert!(!verify_password("password", DUMMY_PASSWORD_HASH));
    }

    #[test]
    fn api_keys_have_a_fixed_shape_and_prefix() {
        let k = api_key(&[0xab; 32]);
        assert_eq!(k.secret.len(), 46);
        assert!(k.secret.starts_with("sk_"));
        assert_eq!(api_key_prefix(&k.secret), Some(k.prefix.as_str()));
        assert_eq!(api_key_prefix("sk_short"), None);
        assert_eq!(api_key_prefix(&k.secret.replace("sk_", "pk_")), None);
    }

    #[test]
    fn token_hashes_are_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
    }
}
