//! Signatures as the Standard Webhooks specification writes them
//! (<https://www.standardwebhooks.com>): `webhook-id`, `webhook-timestamp`
//! (Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">`. The timestamp is signed, so a receiver that
//! refuses old timestamps refuses replays; the id is the CloudEvent's, so it
//! drops a second delivery. The key is the operator's file: `whsec_` and
//! base64 (the specification's form, as its libraries generate it), or the
//! file's bytes as they are.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

/// The shortest key taken: 128 bits.
pub const MIN_KEY_BYTES: usize = 16;

/// Why a signing key cannot be used (never quoting it).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("starts with whsec_ but the rest is not base64")]
    Base64,
    #[error("is shorter than {MIN_KEY_BYTES} bytes")]
    Short,
}

/// An HMAC key; its bytes are never shown (`Debug` says how long it is).
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

impl Key {
    /// A key from a key file's contents (surrounding whitespace ignored).
    pub fn parse(text: &[u8]) -> Result<Self, KeyError> {
        let text = text.trim_ascii();
        let bytes = match text.strip_prefix(b"whsec_") {
            Some(encoded) => STANDARD.decode(encoded).map_err(|_| KeyError::Base64)?,
            None => text.to_vec(),
        };
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyError::Short);
        }
        Ok(Self(bytes))
    }

    /// The `webhook-signature` value of `body` sent as `id` at `timestamp`.
    pub fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // (Any key length is valid for HMAC.)
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference
    /// libraries (their tests): this key, id, timestamp and payload sign
    /// to this value.
    #[test]
    fn signs_as_the_specifications_reference_libraries() {
        let key = Key::parse(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = key.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn keys_are_checked_and_never_shown() {
        assert_eq!(Key::parse(b"whsec_***").unwrap_err(), KeyError::Base64);
        assert_eq!(Key::parse(b"short\n").unwrap_err(), KeyError::Short);
        let raw = Key::parse(b"  a-raw-key-of-enough-bytes\n").unwrap();
        assert_eq!(format!("{raw:?}"), "Key(25 bytes)");
        // A raw key and its whsec_ form sign alike.
        let encoded = format!("whsec_{}", STANDARD.encode("a-raw-key-of-enough-bytes"));
        let same = Key::parse(encoded.as_bytes()).unwrap();
        assert_eq!(raw.signature("i", 1, b"b"), same.signature("i", 1, b"b"));
    }
}
