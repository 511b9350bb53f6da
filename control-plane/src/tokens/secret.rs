//! API token secrets: generation from the OS CSPRNG, the recognisable format,
//! and the SHA-256 digest that is all the store and Envoy ever see.
//!
//! Format: `apt_` + 32 random base62 characters + 6 base62 characters of
//! checksum, 42 characters in all: `apt_<32 random><6 checksum>`.
//!
//! - The 32 random characters are drawn uniformly from `[0-9A-Za-z]` (rejection
//!   sampling of OS random bytes): 32 * log2(62) = 190 bits of entropy.
//! - The checksum is the CRC-32 (IEEE) of the first 36 characters (prefix and
//!   random part), written as 6 base62 digits, most significant first.
//! - The prefix lets secret scanners find leaked secrets; the checksum lets
//!   them (and the control plane) tell a real secret from a lookalike, and
//!   rejects an obviously mistyped one before any lookup.
//! - Every character is in the RFC 6750 `b64token` set, so the secret travels
//!   unchanged in `Authorization: Bearer <secret>`.
//!
//! The filter does not care about the format: it looks up any opaque secret by
//! its digest, so secrets issued elsewhere (e.g. UUIDs) can be imported as
//! digests.

use apitokens_core::table::Digest;
use std::fmt;

pub const PREFIX: &str = "apt_";
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
pub const SECRET_LEN: usize = PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A secret in memory. `Debug` and `Display` never show it: the only way out
/// is [`Secret::expose`], used for the one-time API response and bootstrap.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A new secret from the OS CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut out = String::with_capacity(SECRET_LEN);
        out.push_str(PREFIX);
        let mut pool = [0u8; 64];
        let mut random_chars = 0;
        while random_chars < RANDOM_LEN {
            getrandom::fill(&mut pool)?;
            for byte in pool {
                // 248 = 4 * 62: bytes below it map uniformly onto the alphabet.
                if byte < 248 && random_chars < RANDOM_LEN {
                    out.push(char::from(base62_digit(u32::from(byte) % 62)));
                    random_chars += 1;
                }
            }
        }
        out.push_str(&checksum(out.as_bytes()));
        Ok(Self(out))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the secret's bytes, as the filter computes it: all that
    /// is ever stored or pushed.
    pub fn digest(&self) -> Digest {
        Digest::of(self.0.as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn base62_digit(n: u32) -> u8 {
    ALPHABET.get(n as usize).copied().unwrap_or(b'0')
}

/// CRC-32 of `body` as 6 base62 digits (62^6 > 2^32).
fn checksum(body: &[u8]) -> String {
    let mut n = crc32fast::hash(body);
    let mut digits = [b'0'; CHECKSUM_LEN];
    for d in digits.iter_mut().rev() {
        *d = base62_digit(n % 62);
        n /= 62;
    }
    digits.iter().map(|d| char::from(*d)).collect()
}

/// What a presented secret looks like, judged without any lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `apt_` with the right length, alphabet and checksum.
    Valid,
    /// Starts with `apt_` but is not a well-formed secret: mistyped or
    /// truncated. Rejected before any lookup.
    Corrupt,
    /// Another format (e.g. an imported UUID): looked up by digest.
    Opaque,
}

pub fn shape(secret: &[u8]) -> Shape {
    let Some(rest) = secret.strip_prefix(PREFIX.as_bytes()) else {
        return Shape::Opaque;
    };
    if secret.len() != SECRET_LEN || !rest.iter().all(u8::is_ascii_alphanumeric) {
        return Shape::Corrupt;
    }
    let (body, sum) = secret.split_at(SECRET_LEN - CHECKSUM_LEN);
    if checksum(body).as_bytes() == sum {
        Shape::Valid
    } else {
        Shape::Corrupt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_secrets_have_the_documented_format() {
        for _ in 0..200 {
            let s = Secret::generate().unwrap();
            let text = s.expose();
            assert_eq!(text.len(), SECRET_LEN);
            assert!(text.starts_with("apt_"));
            assert!(text[4..].bytes().all(|c| c.is_ascii_alphanumeric()));
            assert_eq!(shape(text.as_bytes()), Shape::Valid);
            // A valid bearer token for the filter's parser.
            let header = format!("Bearer {text}");
            assert_eq!(apitokens_core::bearer::parse(header.as_bytes()), Ok(text.as_bytes()));
        }
    }

    #[test]
    fn secrets_are_unique_and_use_the_whole_alphabet() {
        let mut seen = HashSet::new();
        let mut chars = HashSet::new();
        for _ in 0..2000 {
            let s = Secret::generate().unwrap();
            chars.extend(s.expose()[4..36].bytes());
            assert!(seen.insert(s.expose().to_owned()));
        }
        assert_eq!(chars.len(), 62);
    }

    #[test]
    fn checksum_catches_typos() {
        let s = Secret::generate().unwrap();
        let text = s.expose().as_bytes().to_vec();
        for i in 4..text.len() {
            let mut typo = text.clone();
            typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
            assert_eq!(shape(&typo), Shape::Corrupt, "typo at {i} not caught");
        }
        assert_eq!(shape(&text[..text.len() - 1]), Shape::Corrupt);
        assert_eq!(shape(b"apt_"), Shape::Corrupt);
        let mut bad_char = text.clone();
        bad_char[10] = b'-';
        assert_eq!(shape(&bad_char), Shape::Corrupt);
    }

    #[test]
    fn other_formats_are_opaque() {
        assert_eq!(shape(b"0b6f3c55-5a4b-4f7c-9d43-3f2f4d5b8e21"), Shape::Opaque);
        assert_eq!(shape(b"APT_abc"), Shape::Opaque);
    }

    #[test]
    fn known_checksum_vector() {
        // CRC-32("apt_" + 32 x '0') fixed once, so the format cannot drift.
        let body = format!("apt_{}", "0".repeat(32));
        let crc = crc32fast::hash(body.as_bytes());
        let mut n = crc;
        let mut expect = Vec::new();
        for _ in 0..6 {
            expect.push(ALPHABET[(n % 62) as usize]);
            n /= 62;
        }
        expect.reverse();
        assert_eq!(checksum(body.as_bytes()).as_bytes(), &expect[..]);
        let full = format!("{body}{}", checksum(body.as_bytes()));
        assert_eq!(shape(full.as_bytes()), Shape::Valid);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::generate().unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains(&s.expose()[4..]));
    }

    #[test]
    fn digest_matches_sha256sum() {
        // printf %s abc | sha256sum
        assert_eq!(
            Digest::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
