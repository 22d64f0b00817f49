//! Project secrets at rest: AES-256-GCM with a random 96-bit nonce per value, under a master
//! key named by a key id so keys can rotate (new values use the first key; older keys still
//! open what they sealed). The associated data binds a ciphertext to its project and its
//! name, so a value cannot be moved to another project or another name by editing rows.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The master keys, newest first.
pub struct MasterKeys {
    keys: Vec<(String, Aes256Gcm)>,
}

/// A sealed value as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub nonce: [u8; 12],
    pub key_id: String,
}

impl Sealed {
    /// One line of text (`key_id:nonce:ciphertext`, both in base64) for a sealed value kept
    /// inside a document rather than in columns of its own.
    pub fn to_text(&self) -> String {
        format!(
            "{}:{}:{}",
            self.key_id,
            STANDARD.encode(self.nonce),
            STANDARD.encode(&self.ciphertext)
        )
    }

    /// Reads [`Sealed::to_text`]; `None` when `text` is not one.
    pub fn from_text(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, ':');
        let (key_id, nonce, ciphertext) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Self {
            key_id: key_id.to_string(),
            nonce: STANDARD.decode(nonce).ok()?.try_into().ok()?,
            ciphertext: STANDARD.decode(ciphertext).ok()?,
        })
    }
}

#[derive(Debug, PartialEq)]
pub enum SecretError {
    /// The master-key setting is malformed (the message never contains key material).
    BadKeys(String),
    /// No configured key has this id: the key was retired too early.
    UnknownKey(String),
    /// The ciphertext does not authenticate (tampered, or moved between rows).
    Corrupt,
}

impl MasterKeys {
    /// Parses `id:base64(32 bytes)` entries separated by commas; the first is current.
    pub fn parse(spec: &str) -> Result<Self, SecretError> {
        let mut keys = Vec::new();
        for (i, entry) in spec
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (id, b64) = entry
                .split_once(':')
                .ok_or_else(|| SecretError::BadKeys(format!("entry {i} must be id:base64key")))?;
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(SecretError::BadKeys(format!(
                    "entry {i} has an invalid key id"
                )));
            }
            let bytes = STANDARD
                .decode(b64)
                .map_err(|_| SecretError::BadKeys(format!("key `{id}` is not base64")))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| SecretError::BadKeys(format!("key `{id}` must be 32 bytes")))?;
            if keys.iter().any(|(k, _)| k == id) {
                return Err(SecretError::BadKeys(format!("key id `{id}` appears twice")));
            }
            keys.push((id.to_string(), cipher));
        }
        if keys.is_empty() {
            return Err(SecretError::BadKeys("no master key is configured".into()));
        }
        Ok(Self { keys })
    }

    pub fn current_id(&self) -> &str {
        &self.keys[0].0
    }

    fn aad(project_id: &str, name: &str) -> Vec<u8> {
        format!("sparkops-secret\n{project_id}\n{name}").into_bytes()
    }

    /// Seals `value` for `project_id`/`name` under the current key with `nonce` (random,
    /// never reused: 12 bytes from the host's RNG per value).
    pub fn seal(&self, project_id: &str, name: &str, value: &str, nonce: [u8; 12]) -> Sealed {
        let (id, cipher) = &self.keys[0];
        let aad = Self::aad(project_id, name);
        let ciphertext = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM sealing cannot fail for values under 64 GiB");
        Sealed {
            ciphertext,
            nonce,
            key_id: id.clone(),
        }
    }

    /// Opens a sealed value of `project_id`/`name`.
    pub fn open(
        &self,
        project_id: &str,
        name: &str,
        sealed: &Sealed,
    ) -> Result<String, SecretError> {
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(id, _)| *id == sealed.key_id)
            .ok_or_else(|| SecretError::UnknownKey(sealed.key_id.clone()))?;
        let aad = Self::aad(project_id, name);
        let plain = cipher
            .decrypt(
                &Nonce::from(sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::Corrupt)?;
        String::from_utf8(plain).map_err(|_| SecretError::Corrupt)
    }

    /// Whether a value is sealed under an older key (re-seal it when next written).
    pub fn is_stale(&self, sealed: &Sealed) -> bool {
        sealed.key_id != self.current_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> String {
        STANDARD.encode([byte; 32])
    }

    const P: &str = "0191e7a2-1f6e-7000-8000-000000000001";

    #[test]
    fn a_sealed_value_as_text_reads_back_and_opens() {
        let keys = MasterKeys::parse(&format!("k1:{}", key(7))).unwrap();
        let sealed = keys.seal(P, "n", "sk_live_1", [3; 12]);
        let text = sealed.to_text();
        assert!(!text.contains("sk_live_1"), "{text}");
        let back = Sealed::from_text(&text).unwrap();
        assert_eq!(back, sealed);
        assert_eq!(keys.open(P, "n", &back).unwrap(), "sk_live_1");
        for bad in ["", "k1", "k1:AAAA", "k1:!!:AAAA", "k1:AAAA:AAAA"] {
            assert_eq!(Sealed::from_text(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_sealed_value_opens_only_for_its_project_and_name() {
        let keys = MasterKeys::parse(&format!("k1:{}", key(1))).unwrap();
        let sealed = keys.seal(P, "provider.openai.api_key", "sk-live-123", [7; 12]);
        assert!(!sealed.ciphertext.windows(11).any(|w| w == b"sk-live-123"));
        assert_eq!(
            keys.open(P, "provider.openai.api_key", &sealed).unwrap(),
            "sk-live-123"
        );
        assert_eq!(
            keys.open(
                "0191e7a2-1f6e-7000-8000-000000000002",
                "provider.openai.api_key",
                &sealed
            ),
            Err(SecretError::Corrupt)
        );
        assert_eq!(keys.open(P, "other", &sealed), Err(SecretError::Corrupt));
        let mut tampered = sealed.clone();
        tampered.ciphertext[0] ^= 1;
        assert_eq!(
            keys.open(P, "provider.openai.api_key", &tampered),
            Err(SecretError::Corrupt)
        );
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_any() {
        let old = MasterKeys::parse(&format!("k1:{}", key(1))).unwrap();
        let sealed_old = old.seal(P, "n", "v1", [1; 12]);
        let rotated = MasterKeys::parse(&format!("k2:{}, k1:{}", key(2), key(1))).unwrap();
        assert_eq!(rotated.open(P, "n", &sealed_old).unwrap(), "v1");
        assert!(rotated.is_stale(&sealed_old));
        let sealed_new = rotated.seal(P, "n", "v2", [2; 12]);
        assert_eq!(sealed_new.key_id, "k2");
        assert!(!rotated.is_stale(&sealed_new));
        assert_eq!(
            old.open(P, "n", &sealed_new),
            Err(SecretError::UnknownKey("k2".into()))
        );
    }

    #[test]
    fn malformed_key_settings_are_refused_without_echoing_keys() {
        for bad in [
            "",
            "k1",
            "k1:notbase64!",
            &format!("k1:{}", STANDARD.encode([1; 16])),
            &format!("k 1:{}", key(1)),
            &format!("k1:{0},k1:{0}", key(1)),
        ] {
            match MasterKeys::parse(bad) {
                Err(SecretError::BadKeys(m)) => assert!(!m.contains(&key(1)), "{m}"),
                _ => panic!("{bad:?} should be refused"),
            }
        }
    }
}
