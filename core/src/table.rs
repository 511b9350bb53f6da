//! The token table: SHA-256 digest of a secret -> the token it identifies.

use crate::name::TokenName;
use crate::role::Role;
use crate::timestamp::Timestamp;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// A SHA-256 digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The SHA-256 digest of `bytes` (a secret).
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(sha2::Sha256::digest(bytes).into())
    }

    /// Exactly 64 lower-case hex characters (the canonical spelling, so that
    /// duplicates are caught by comparing digests).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            if let [hi, lo] = pair {
                *byte = (nibble(*hi)? << 4) | nibble(*lo)?;
            }
        }
        Some(Self(out))
    }

    pub fn to_hex(&self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

// A digest is already uniformly distributed, and clients cannot insert keys,
// so its first eight bytes are a perfectly good hash: no SipHash per request.
impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(self.0.get(..8).unwrap_or(&[0; 8]));
        state.write_u64(u64::from_le_bytes(first));
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A token as the filter needs it: who it is, what it may do, until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// `namespaces/{namespace}/apitokens/{token}`.
    name: Box<str>,
    namespace_len: u8,
    pub role: Role,
    pub expire: Option<Timestamp>,
}

const NAMESPACE_START: usize = "namespaces/".len();

impl Token {
    pub fn new(name: &TokenName<'_>, role: Role, expire: Option<Timestamp>) -> Self {
        Self {
            name: name.to_string().into_boxed_str(),
            // A DNS label is at most 63 bytes.
            namespace_len: u8::try_from(name.namespace.len()).unwrap_or(u8::MAX),
            role,
            expire,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        self.name
            .get(NAMESPACE_START..NAMESPACE_START + usize::from(self.namespace_len))
            .unwrap_or("")
    }

    /// Expired from `expire` on, inclusive: `expireTime` == now is expired.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expire.is_some_and(|expire| expire <= now)
    }
}

#[derive(Clone, Debug, Default)]
pub struct TokenTable {
    tokens: HashMap<Digest, Token, BuildHasherDefault<DigestHasher>>,
}

impl TokenTable {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            tokens: HashMap::with_capacity_and_hasher(n, BuildHasherDefault::default()),
        }
    }

    /// False when the digest is already present (the table is unchanged).
    pub fn insert(&mut self, digest: Digest, token: Token) -> bool {
        use std::collections::hash_map::Entry;
        match self.tokens.entry(digest) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(token);
                true
            }
        }
    }

    pub fn get(&self, digest: &Digest) -> Option<&Token> {
        self.tokens.get(digest)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}
