//! A stored token row as both backends read it, and its decoding into a
//! [`TokenRecord`]: one place for what a readable row is, so SQLite and
//! PostgreSQL refuse the same damaged rows with the same words.

use super::{StoreError, TokenRecord};
use apitokens_core::name::TokenName;
use apitokens_core::table::Digest;
use apitokens_core::{Role, Timestamp};

/// The columns every token query selects, in [`Row`]'s order.
pub(super) const COLUMNS: &str =
    "name, role, secret_sha256, create_seconds, create_nanos, expire_seconds, expire_nanos, retired";

/// name, role, secret_sha256, create (seconds, nanos), expire (seconds,
/// nanos), retired.
pub(super) type Row = (String, String, String, i64, i64, Option<i64>, Option<i64>, bool);

/// A row as a record; a row that does not decode is an error naming it.
pub(super) fn decode(
    (name, role, digest, create_s, create_n, expire_s, expire_n, retired): Row,
) -> Result<TokenRecord, StoreError> {
    let corrupt = |problem: &str| StoreError::Corrupt {
        name: name.clone(),
        problem: problem.to_owned(),
    };
    let time = |secs: i64, nanos: i64| {
        u32::try_from(nanos)
            .ok()
            .filter(|n| *n < 1_000_000_000)
            .map(|n| Timestamp::from_unix(secs, n))
    };
    TokenName::parse(&name).map_err(|_| corrupt("not a token name"))?;
    let record = TokenRecord {
        role: Role::parse(&role).ok_or_else(|| corrupt("unknown role"))?,
        digest: Digest::from_hex(&digest).ok_or_else(|| corrupt("secret_sha256 is not a digest"))?,
        create_time: time(create_s, create_n).ok_or_else(|| corrupt("bad create time"))?,
        expire_time: match (expire_s, expire_n) {
            (None, None) => None,
            (Some(s), Some(n)) => Some(time(s, n).ok_or_else(|| corrupt("bad expire time"))?),
            _ => return Err(corrupt("bad expire time")),
        },
        retired,
        name: name.clone(),
    };
    Ok(record)
}
