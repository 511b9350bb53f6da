//! The token table: SHA-256 digest of a secret -> the token it identifies.
//!
//! The table is one flat buffer, the same bytes the control plane pushes in
//! the compact encoding (see `compact`): fixed-size entries sorted by digest,
//! then a pool of names. A VM keeps the buffer it received and looks tokens
//! up in place: no per-token allocation, no parse beyond one validating pass,
//! about 90 bytes per token. Digests are uniformly distributed, so an
//! interpolation search finds one in a few probes whatever the table's size.
//!
//! ```text
//! u32 N                        entry count (little endian, like every integer)
//! N x 52 bytes, sorted strictly ascending by digest:
//!   [0..32)  SHA-256 digest of the secret
//!   [32..40) expireTime: i64 seconds since the Unix epoch
//!   [40..44) expireTime: u32 nanoseconds; u32::MAX = the token never expires
//!   [44..48) u32 offset of the token's name in the pool
//!   [48]     role: 0 viewer, 1 editor, 2 owner
//!   [49]     flags: bit 0 = the token's previous secret (a rotation's
//!            overlap), bit 1 = the token is disabled (suspended by its
//!            owner: refused, kept), bit 2 = the token has conditions
//!            (see `conditions`), every other bit zero
//!   [50..52) zero
//! u32 P                        pool size in bytes, then the pool: every name as
//!                              a u8 length and the bytes, strictly ascending,
//!                              each used by exactly one current entry and at
//!                              most one previous entry; a name whose entries
//!                              have conditions is followed by them: u16
//!                              length and the encoded conditions
//! ```
//!
//! A token has one entry for its current secret and, while a rotation's
//! overlap lasts, one for its previous secret: same name and role, its own
//! expiry (the end of the overlap, or the token's, whichever comes first).
//! A disabled token's entries both carry the disabled bit (the control plane
//! and the JSON configuration set it on both; each entry is decided on its
//! own bit, so the lookup never needs the other entry).
//!
//! Conditions sit after the name both entries share, so a token without
//! them pays nothing and one with them is found with its name. A filter
//! older than conditions refuses a table holding any (an unknown flag):
//! it never admits a token while ignoring what narrows it.

use crate::conditions::{Conditions, Encoded};
use crate::error::ConfigError;
use crate::name::{is_token_name, TokenName};
use crate::role::Role;
use crate::spec::TokenSpec;
use crate::timestamp::Timestamp;
use sha2::Digest as _;
use std::sync::Arc;

mod edit;
mod overlay;
pub use edit::{Change, EditStats, Flush, LiveTable, Staged, TokenEntries, Written};
pub use overlay::Overlay;

/// A SHA-256 digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The SHA-256 digest of `bytes` (a secret).
    pub fn of(bytes: &[u8]) -> Self {
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

/// A token as the filter needs it: who it is, what it may do, until when.
/// A view into the table; cheap to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token<'t> {
    name: &'t str,
    role: Role,
    expire: Option<Timestamp>,
    previous: bool,
    disabled: bool,
    conditions: Option<Encoded<'t>>,
    index: u32,
}

const NAMESPACE_START: usize = "namespaces/".len();

impl<'t> Token<'t> {
    /// `namespaces/{namespace}/apitokens/{token}`.
    pub fn name(&self) -> &'t str {
        self.name
    }

    pub fn namespace(&self) -> &'t str {
        let rest = self.name.get(NAMESPACE_START..).unwrap_or_default();
        rest.split('/').next().unwrap_or_default()
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn expire(&self) -> Option<Timestamp> {
        self.expire
    }

    /// Whether the secret was the token's previous one (a rotation's overlap).
    pub fn is_previous(&self) -> bool {
        self.previous
    }

    /// Whether the token is disabled (suspended by its owner): refused
    /// until it is enabled again, with the same secret.
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// The token's conditions (from when, from where), if it has any.
    pub fn conditions(&self) -> Option<Encoded<'t>> {
        self.conditions
    }

    /// The entry's position in its table (a key for per-table bookkeeping,
    /// such as which tokens were used).
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// Expired from `expire` on, inclusive: `expireTime` == now is expired.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expire.is_some_and(|expire| expire <= now)
    }
}

const ENTRY: usize = 52;
const NEVER: u32 = u32::MAX;
const PREVIOUS: u8 = 1;
const DISABLED: u8 = 2;
const CONDITIONS: u8 = 4;

/// A token as it goes into a table: typed and validated fields (the JSON
/// configuration's strings are parsed once, into this).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// `namespaces/{namespace}/apitokens/{token}`.
    pub name: &'a str,
    pub role: Role,
    pub digest: Digest,
    pub expire: Option<Timestamp>,
    /// The token's previous secret, accepted until `expire` after a
    /// regeneration with an overlap.
    pub previous: bool,
    /// The token is disabled: refused, but kept (name, role, secrets).
    pub disabled: bool,
    /// The token's conditions, the same on both its entries.
    pub conditions: Option<Encoded<'a>>,
}

/// The token table over its flat buffer. The buffer is shared, not copied:
/// the filter hands over the bytes it received, the control plane shares one
/// buffer between the push to every Envoy and its own API's lookups.
#[derive(Clone, Debug, Default)]
pub struct TokenTable {
    buf: Arc<Vec<u8>>,
    /// Where the entries start in `buf`.
    entries: usize,
    count: usize,
    /// Where the pool starts in `buf`.
    pool: usize,
}

/// The first 8 bytes of a digest as a big-endian number (their order).
fn prefix64(digest: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(digest.get(..8)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn i64_at(buf: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_le_bytes(buf.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

pub(crate) fn role_code(role: Role) -> u8 {
    match role {
        Role::Viewer => 0,
        Role::Editor => 1,
        Role::Owner => 2,
    }
}

pub(crate) fn role_of(code: u8) -> Option<Role> {
    match code {
        0 => Some(Role::Viewer),
        1 => Some(Role::Editor),
        2 => Some(Role::Owner),
        _ => None,
    }
}

fn table_error(problem: impl Into<String>) -> ConfigError {
    ConfigError::new("tokens", problem)
}

impl TokenTable {
    /// Validates the tokens of a JSON configuration (errors name
    /// `tokens[i].field` in the order given) and lays them out as a table.
    pub fn from_specs(specs: &[TokenSpec]) -> Result<Self, ConfigError> {
        let mut buf = Vec::new();
        encode_specs(specs, &mut buf)?;
        Self::from_buffer(buf, 0)
    }

    /// Takes `buf` whose table section starts at `start`, validating every
    /// entry and name as strictly as the JSON configuration is validated.
    pub fn from_buffer(buf: Vec<u8>, start: usize) -> Result<Self, ConfigError> {
        Self::shared(Arc::new(buf), start)
    }

    /// [`TokenTable::from_buffer`] over a shared buffer.
    pub fn shared(buf: Arc<Vec<u8>>, start: usize) -> Result<Self, ConfigError> {
        let table = Self::framed(buf, start)?;
        table.validate()?;
        Ok(table)
    }

    /// Checks the framing (counts and sizes) only, not each entry and name:
    /// for a table this process built itself with [`LiveTable`], whose every
    /// entry was validated on the way in.
    pub(crate) fn framed(buf: Arc<Vec<u8>>, start: usize) -> Result<Self, ConfigError> {
        let truncated = || table_error("the compact table is truncated");
        let count = usize::try_from(u32_at(&buf, start).ok_or_else(truncated)?).map_err(|_| truncated())?;
        let entries = start + 4;
        let pool_len_at = count
            .checked_mul(ENTRY)
            .and_then(|n| n.checked_add(entries))
            .ok_or_else(truncated)?;
        let pool_len = usize::try_from(u32_at(&buf, pool_len_at).ok_or_else(truncated)?).map_err(|_| truncated())?;
        let pool = pool_len_at + 4;
        if pool.checked_add(pool_len) != Some(buf.len()) {
            return Err(table_error("the compact table's pool does not end the buffer"));
        }
        Ok(Self {
            buf,
            entries,
            count,
            pool,
        })
    }

    /// The whole buffer the table lives in (for the compact encoding: the
    /// header and settings too).
    pub fn buffer(&self) -> &Arc<Vec<u8>> {
        &self.buf
    }

    /// Where the table section starts in [`TokenTable::buffer`].
    pub fn start(&self) -> usize {
        self.entries - 4
    }

    fn pool(&self) -> &[u8] {
        self.buf.get(self.pool..).unwrap_or_default()
    }

    fn entries_bytes(&self) -> Option<&[u8]> {
        self.buf
            .get(self.entries..self.entries.checked_add(self.count.checked_mul(ENTRY)?)?)
    }

    fn entry(&self, i: usize) -> Option<&[u8]> {
        let at = self.entries.checked_add(i.checked_mul(ENTRY)?)?;
        self.buf.get(at..at.checked_add(ENTRY)?)
    }

    fn name_at(&self, offset: usize) -> Option<&str> {
        let pool = self.pool();
        let len = usize::from(*pool.get(offset)?);
        std::str::from_utf8(pool.get(offset + 1..offset + 1 + len)?).ok()
    }

    /// The conditions after the name at `offset` (its entries say there are).
    fn conditions_at(&self, offset: usize) -> Option<Encoded<'_>> {
        let pool = self.pool();
        let at = offset + 1 + usize::from(*pool.get(offset)?);
        let len = usize::from(u16::from_le_bytes(pool.get(at..at + 2)?.try_into().ok()?));
        Some(Encoded::trusted(pool.get(at + 2..at + 2 + len)?))
    }

    fn token(&self, entry: &[u8], index: usize) -> Option<Token<'_>> {
        let nanos = u32_at(entry, 40)?;
        let expire = (nanos != NEVER).then(|| Timestamp::from_unix(i64_at(entry, 32).unwrap_or(i64::MIN), nanos));
        let offset = usize::try_from(u32_at(entry, 44)?).ok()?;
        let name = self.name_at(offset)?;
        let flags = *entry.get(49)?;
        let conditions = if flags & CONDITIONS != 0 {
            Some(self.conditions_at(offset)?)
        } else {
            None
        };
        Some(Token {
            name,
            role: role_of(*entry.get(48)?)?,
            expire,
            previous: flags & PREVIOUS != 0,
            disabled: flags & DISABLED != 0,
            conditions,
            index: u32::try_from(index).ok()?,
        })
    }

    /// Every name valid, sorted and unique; every entry's digest sorted and
    /// unique, its role, flags and expiry valid; every name used by exactly
    /// one current entry and at most one previous entry; a token's
    /// conditions valid, and flagged on both its entries. A pass over the
    /// entries' flags, one over the names and one over the entries, no
    /// allocation per token (bitmaps of one bit per byte of names, one more
    /// for a table with conditions): it bounds how long a VM takes to
    /// accept a million tokens.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let pool = self.pool();
        let entries = self
            .entries_bytes()
            .ok_or_else(|| table_error("the compact table is truncated"))?;
        // Which names are followed by conditions: those whose entries say
        // so (whether each is the start of a name is checked below).
        // (Allocated only for a table that has any.)
        let mut conditioned: Vec<u64> = Vec::new();
        for entry in entries.chunks_exact(ENTRY) {
            if entry.get(49).is_some_and(|f| f & CONDITIONS != 0) {
                if conditioned.is_empty() {
                    conditioned = vec![0u64; pool.len() / 64 + 1];
                }
                let offset = u32_at(entry, 44)
                    .and_then(|o| usize::try_from(o).ok())
                    .unwrap_or(usize::MAX);
                if let Some(word) = conditioned.get_mut(offset / 64) {
                    *word |= 1 << (offset % 64);
                }
            }
        }
        let has_conditions = |at: usize| conditioned.get(at / 64).is_some_and(|w| w & (1 << (at % 64)) != 0);
        // Names: valid, strictly ascending (hence unique); remember where each starts.
        let mut starts = vec![0u64; pool.len() / 64 + 1];
        let mut names = 0usize;
        let mut at = 0usize;
        let mut previous: &[u8] = &[];
        while let Some(&len) = pool.get(at) {
            let name = pool
                .get(at + 1..at + 1 + usize::from(len))
                .ok_or_else(|| table_error("a name runs past the pool"))?;
            if !is_token_name(name) {
                // The slow path, for the message.
                let problem = std::str::from_utf8(name)
                    .map_err(|_| "is not UTF-8".to_owned())
                    .and_then(|text| TokenName::parse(text).map(drop).map_err(|e| e.to_string()))
                    .err()
                    .unwrap_or_default();
                return Err(table_error(format!("name {names}: {problem}")));
            }
            if names > 0 && previous >= name {
                return Err(table_error(format!("name {names}: names must be unique and sorted")));
            }
            previous = name;
            if let Some(word) = starts.get_mut(at / 64) {
                *word |= 1 << (at % 64);
            }
            let start = at;
            at += 1 + usize::from(len);
            if has_conditions(start) {
                let bad = |problem: &str| table_error(format!("name {names}: conditions: {problem}"));
                let len = pool
                    .get(at..at + 2)
                    .and_then(|b| b.try_into().ok())
                    .map(u16::from_le_bytes)
                    .ok_or_else(|| bad("truncated"))?;
                let bytes = pool
                    .get(at + 2..at + 2 + usize::from(len))
                    .ok_or_else(|| bad("run past the pool"))?;
                Conditions::decode(bytes).map_err(bad)?;
                at += 2 + usize::from(len);
            }
            names += 1;
        }
        // A name's current entry clears its bit in `current`; its previous
        // entry (if any) its bit in `previous_of`.
        let mut previous_of = starts.clone();
        let mut current = starts;
        let mut currents = 0usize;
        // Entries: strictly ascending digests (hence unique), a known role
        // and flags, a valid expiry, and a name as above.
        let mut previous: &[u8] = &[];
        for (i, entry) in entries.chunks_exact(ENTRY).enumerate() {
            let bad = |problem: &str| table_error(format!("entry {i}: {problem}"));
            let (digest, fields) = entry.split_at(32);
            // Compared by the first 8 bytes, all 32 only on a tie.
            let ascending = match (prefix64(previous), prefix64(digest)) {
                (Some(p), Some(d)) if p != d => p < d,
                _ => previous < digest,
            };
            if i > 0 && !ascending {
                return Err(bad("digests must be unique and sorted"));
            }
            previous = digest;
            let nanos = u32_at(fields, 8).ok_or_else(|| bad("truncated"))?;
            if nanos != NEVER {
                if nanos >= 1_000_000_000 {
                    return Err(bad("expireTime nanoseconds out of range"));
                }
                // The same bound as the JSON configuration's timestamps.
                let secs = i64_at(fields, 0).ok_or_else(|| bad("truncated"))?;
                if !Timestamp::from_unix(secs, nanos).in_range() {
                    return Err(bad(
                        "expireTime must lie between 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
                    ));
                }
            }
            if fields.get(16).copied().and_then(role_of).is_none() {
                return Err(bad("unknown role"));
            }
            // Known flag bits only (a flag this filter does not know could
            // be one that refuses the token: never read it as absent).
            let (is_previous, with_conditions) = match fields.get(17..20) {
                Some([flags, 0, 0]) if flags & !(PREVIOUS | DISABLED | CONDITIONS) == 0 => {
                    (flags & PREVIOUS != 0, flags & CONDITIONS != 0)
                }
                _ => return Err(bad("unknown flags")),
            };
            let offset = usize::try_from(u32_at(fields, 12).ok_or_else(|| bad("truncated"))?)
                .map_err(|_| bad("name offset out of range"))?;
            // Both entries of a token say whether it has conditions.
            if with_conditions != has_conditions(offset) {
                return Err(bad("its name's conditions and its flags disagree"));
            }
            let bits = if is_previous { &mut previous_of } else { &mut current };
            let word = bits
                .get_mut(offset / 64)
                .ok_or_else(|| bad("name offset out of range"))?;
            let bit = 1u64 << (offset % 64);
            if *word & bit == 0 {
                return Err(bad(
                    "name offset is not the start of a name no other entry of its kind uses",
                ));
            }
            *word &= !bit;
            currents += usize::from(!is_previous);
        }
        if currents != names {
            return Err(table_error("every name must belong to exactly one current entry"));
        }
        Ok(())
    }

    /// The entry index holding `digest` (`Ok`), or where it would go (`Err`).
    fn position(&self, digest: &Digest) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0usize, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.entry(mid).and_then(|e| e.get(..32)).map(|d| d.cmp(&digest.0[..])) {
                Some(std::cmp::Ordering::Less) => lo = mid + 1,
                Some(std::cmp::Ordering::Greater) | None => hi = mid,
                Some(std::cmp::Ordering::Equal) => return Ok(mid),
            }
        }
        Err(lo)
    }

    /// The digest of the entry at `index` (see [`Token::index`]).
    pub fn digest_at(&self, index: usize) -> Option<Digest> {
        Some(Digest(self.entry(index)?.get(..32)?.try_into().ok()?))
    }

    /// The token whose secret has this digest.
    pub fn get(&self, digest: &Digest) -> Option<Token<'_>> {
        let key = &digest.0[..];
        let digest_of = |i: usize| self.entry(i).and_then(|e| e.get(..32));
        let prefix = |d: &[u8]| d.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
        let target = prefix(key);
        // Interpolation search: the digests are uniform, so the guess lands
        // within a few entries; after a few rounds, plain bisection bounds the
        // worst case.
        let (mut lo, mut hi) = (0usize, self.count);
        let mut rounds = 0;
        while lo < hi {
            let mid = if rounds < 4 {
                let (first, last) = (prefix(digest_of(lo)?), prefix(digest_of(hi - 1)?));
                if target < first || target > last {
                    return None;
                }
                let span = u128::from(last - first);
                let guess = (u128::from(target - first) * (hi - lo - 1) as u128)
                    .checked_div(span)
                    .unwrap_or(0);
                lo + guess as usize
            } else {
                lo + (hi - lo) / 2
            };
            rounds += 1;
            let entry = self.entry(mid)?;
            match entry.get(..32)?.cmp(key) {
                std::cmp::Ordering::Equal => return self.token(entry, mid),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every token, in digest order (for tools and tests; not the request path).
    pub fn iter(&self) -> impl Iterator<Item = (Digest, Token<'_>)> + '_ {
        (0..self.count).filter_map(|i| {
            let entry = self.entry(i)?;
            let digest = Digest(entry.get(..32)?.try_into().ok()?);
            Some((digest, self.token(entry, i)?))
        })
    }
}

/// Validates `specs` and appends their table section to `out`.
pub(crate) fn encode_specs(specs: &[TokenSpec], out: &mut Vec<u8>) -> Result<(), ConfigError> {
    // Every token's encoded conditions, one after the other; each entry's
    // range in it, lent to the entries once all are encoded.
    let mut encoded_conditions = Vec::new();
    let mut conditioned: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    let mut entries = Vec::with_capacity(specs.len());
    // Which spec each entry comes from, for the error messages.
    let mut origin = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let field = |f: &str| format!("tokens[{index}].{f}");
        TokenName::parse(&spec.name).map_err(|e| ConfigError::new(field("name"), e.to_string()))?;
        let role = Role::parse(&spec.role)
            .ok_or_else(|| ConfigError::new(field("role"), "unknown role; expected viewer, editor or owner"))?;
        let digest = |f: &str, hex: &str| {
            Digest::from_hex(hex).ok_or_else(|| {
                ConfigError::new(
                    field(f),
                    "must be 64 lower-case hex characters: the SHA-256 digest of the secret, never the secret itself",
                )
            })
        };
        let time = |f: &str, text: Option<&str>| {
            text.map(Timestamp::parse_rfc3339)
                .transpose()
                .map_err(|e| ConfigError::new(field(f), e.to_string()))
        };
        let expire = time("expireTime", spec.expire_time.as_deref())?;
        let disabled = spec.disabled;
        let digest_of_secret = digest("secretSha256", &spec.secret_sha256)?;
        let stated = Conditions::from_spec(
            spec.not_before_time.as_deref(),
            expire,
            spec.client_addresses.as_ref(),
            spec.rate_limit.as_ref(),
            field,
        )?;
        if let Some(stated) = stated {
            let at = encoded_conditions.len();
            encoded_conditions.extend_from_slice(&stated.encode());
            // This entry and its previous secret's, if any.
            let range = at..encoded_conditions.len();
            conditioned.push((entries.len(), range.clone()));
            if spec.previous_secret_sha256.is_some() {
                conditioned.push((entries.len() + 1, range));
            }
        }
        entries.push(Entry {
            name: &spec.name,
            role,
            digest: digest_of_secret,
            expire,
            previous: false,
            disabled,
            conditions: None,
        });
        origin.push((index, "secretSha256"));
        match (&spec.previous_secret_sha256, &spec.previous_secret_expire_time) {
            (None, None) => {}
            (Some(hex), Some(until)) => {
                let until = time("previousSecretExpireTime", Some(until))?;
                entries.push(Entry {
                    name: &spec.name,
                    role,
                    digest: digest("previousSecretSha256", hex)?,
                    // The overlap never outlives the token.
                    expire: match (until, expire) {
                        (Some(u), Some(e)) => Some(u.min(e)),
                        (u, e) => u.or(e),
                    },
                    previous: true,
                    // A disabled token's previous secret is refused too
                    // (and bound by the same conditions, set below).
                    disabled,
                    conditions: None,
                });
                origin.push((index, "previousSecretSha256"));
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    field("previousSecretExpireTime"),
                    "is required with previousSecretSha256: an overlap must end",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    field("previousSecretSha256"),
                    "is required with previousSecretExpireTime",
                ))
            }
        }
    }
    for (i, range) in conditioned {
        if let (Some(entry), Some(bytes)) = (entries.get_mut(i), encoded_conditions.get(range)) {
            entry.conditions = Some(Encoded::trusted(bytes));
        }
    }
    let at = |i: usize| origin.get(i).copied().unwrap_or((i, "secretSha256"));
    write_table(&entries, out).map_err(|dup| match dup {
        Duplicate::Name { first, dup } => ConfigError::new(
            format!("tokens[{}].name", at(dup).0),
            format!("duplicate of tokens[{}].name", at(first).0),
        ),
        Duplicate::Digest { first, dup } => {
            let ((d, df), (f, ff)) = (at(dup), at(first));
            ConfigError::new(format!("tokens[{d}].{df}"), format!("duplicate of tokens[{f}].{ff}"))
        }
        // encode_specs pairs every previous secret with its token.
        Duplicate::Orphan { index } => ConfigError::new(format!("tokens[{}]", at(index).0), "no current secret"),
    })
}

/// Entries that cannot share a table: indices into the input, the first
/// offending one in input order and the entry it conflicts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Duplicate {
    /// Two current entries (or two previous ones) with the same name.
    Name {
        first: usize,
        dup: usize,
    },
    Digest {
        first: usize,
        dup: usize,
    },
    /// A previous entry whose name has no current entry (or whose
    /// conditions are not its current entry's).
    Orphan {
        index: usize,
    },
}

/// Appends the table section of `entries` (already validated one by one) to
/// `out`: sorted by digest, the current entries' names pooled in name order.
pub fn write_table(entries: &[Entry<'_>], out: &mut Vec<u8>) -> Result<(), Duplicate> {
    let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
    let indexed: Vec<(usize, &Entry<'_>)> = entries.iter().enumerate().collect();

    // Names: sorted (a name's current entry before its previous one), the
    // first duplicate in input order reported.
    let mut by_name: Vec<&(usize, &Entry<'_>)> = indexed.iter().collect();
    by_name.sort_by(|a, b| {
        a.1.name
            .cmp(b.1.name)
            .then(a.1.previous.cmp(&b.1.previous))
            .then(a.0.cmp(&b.0))
    });
    if let Some((first, dup)) = first_duplicate(
        &by_name,
        |a, b| a.1.name == b.1.name && a.1.previous == b.1.previous,
        |a| a.0,
    ) {
        return Err(Duplicate::Name { first, dup });
    }
    let mut pool = Vec::with_capacity(entries.iter().map(|e| record_len(e.name, e.conditions)).sum());
    let mut offsets = vec![0u32; entries.len()];
    let mut current: Option<(&str, Option<Encoded<'_>>, u32)> = None;
    for (index, entry) in &by_name {
        let offset = if entry.previous {
            match current {
                Some((name, conditions, offset)) if name == entry.name && conditions == entry.conditions => offset,
                _ => return Err(Duplicate::Orphan { index: *index }),
            }
        } else {
            let offset = u32::try_from(pool.len()).unwrap_or(u32::MAX);
            push_record(&mut pool, entry.name, entry.conditions);
            current = Some((entry.name, entry.conditions, offset));
            offset
        };
        if let Some(slot) = offsets.get_mut(*index) {
            *slot = offset;
        }
    }

    let mut by_digest: Vec<&(usize, &Entry<'_>)> = indexed.iter().collect();
    by_digest.sort_by(|a, b| a.1.digest.cmp(&b.1.digest).then(a.0.cmp(&b.0)));
    if let Some((first, dup)) = first_duplicate(&by_digest, |a, b| a.1.digest == b.1.digest, |a| a.0) {
        return Err(Duplicate::Digest { first, dup });
    }
    out.reserve(8 + entries.len() * ENTRY + pool.len());
    out.extend_from_slice(&count.to_le_bytes());
    for (index, entry) in &by_digest {
        push_entry(out, entry, offsets.get(*index).copied().unwrap_or_default());
    }
    out.extend_from_slice(&u32::try_from(pool.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&pool);
    Ok(())
}

/// One name in the pool: a length byte and the bytes (a DNS-label
/// namespace and token id keep a valid name under 256 bytes), then its
/// token's conditions, if any: a u16 length and the bytes (at most
/// [`crate::conditions::MAX_RANGES`] ranges per list keep them under 2 KB).
fn push_record(pool: &mut Vec<u8>, name: &str, conditions: Option<Encoded<'_>>) {
    pool.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    pool.extend_from_slice(name.as_bytes());
    if let Some(c) = conditions {
        pool.extend_from_slice(&u16::try_from(c.bytes().len()).unwrap_or(u16::MAX).to_le_bytes());
        pool.extend_from_slice(c.bytes());
    }
}

/// The bytes [`push_record`] writes.
fn record_len(name: &str, conditions: Option<Encoded<'_>>) -> usize {
    1 + name.len() + conditions.map_or(0, |c| 2 + c.bytes().len())
}

/// An entry's digest and expiry as the table (and a delta record) lays
/// them out: 32 bytes, i64 seconds, u32 nanoseconds (`u32::MAX`: never).
pub(crate) fn push_digest_and_expiry(out: &mut Vec<u8>, entry: &Entry<'_>) {
    out.extend_from_slice(&entry.digest.0);
    let (secs, nanos) = entry
        .expire
        .map_or((0, NEVER), |t| (t.unix_seconds(), t.subsec_nanos()));
    out.extend_from_slice(&secs.to_le_bytes());
    out.extend_from_slice(&nanos.to_le_bytes());
}

/// An entry's flags byte.
fn flags(entry: &Entry<'_>) -> u8 {
    (if entry.previous { PREVIOUS } else { 0 })
        | (if entry.disabled { DISABLED } else { 0 })
        | (if entry.conditions.is_some() { CONDITIONS } else { 0 })
}

fn push_entry(out: &mut Vec<u8>, entry: &Entry<'_>, name_offset: u32) {
    push_digest_and_expiry(out, entry);
    out.extend_from_slice(&name_offset.to_le_bytes());
    out.extend_from_slice(&[role_code(entry.role), flags(entry), 0, 0]);
}

/// In a list sorted by key, ties by input index: the duplicate that comes
/// first in input order, with the index of the token it duplicates.
fn first_duplicate<T>(
    sorted: &[&T],
    same: impl Fn(&T, &T) -> bool,
    index: impl Fn(&T) -> usize,
) -> Option<(usize, usize)> {
    let mut in_group = false;
    let mut best: Option<(usize, usize)> = None;
    for pair in sorted.windows(2) {
        if let [a, b] = pair {
            let dup = same(a, b);
            // Only a group's first two members: the original and its earliest copy.
            if dup && !in_group && best.map_or(true, |(_, d)| index(b) < d) {
                best = Some((index(a), index(b)));
            }
            in_group = dup;
        }
    }
    best
}
