//! What every write checks before it commits, the same in both backends:
//! the records keep the program's invariants, a namespace stays within its
//! quota, a digest belongs to one token (current or previous secret), and
//! what running into a unique index means.

use super::{Result, StoreError, TokenRecord};
use apitokens_core::name::TokenName;
use std::collections::BTreeMap;

/// Refuses records that break the invariants the rest of the program
/// relies on (a name that is not a token name).
pub(super) fn valid(records: &[TokenRecord]) -> Result<()> {
    for r in records {
        TokenName::parse(&r.name).map_err(|e| StoreError::Corrupt {
            name: r.name.clone(),
            problem: format!("name: {e}"),
        })?;
    }
    Ok(())
}

/// A namespace quota on an insert: how many tokens it adds to each
/// namespace, checked against how many each holds before it (counted in the
/// write's transaction, which sees every earlier write).
pub(super) struct Quota<'r> {
    limit: u32,
    added: BTreeMap<&'r str, i64>,
}

impl<'r> Quota<'r> {
    pub(super) fn new(records: &'r [TokenRecord], limit: u32) -> Self {
        let mut added: BTreeMap<&str, i64> = BTreeMap::new();
        for r in records {
            *added.entry(r.namespace()).or_default() += 1;
        }
        Self { limit, added }
    }

    /// The namespaces the insert adds to, in order.
    pub(super) fn namespaces(&self) -> Vec<&'r str> {
        self.added.keys().copied().collect()
    }

    /// Refuses the insert if a namespace would then hold more than the
    /// limit; `held` counts a namespace's tokens before it.
    pub(super) fn check(&self, mut held: impl FnMut(&str) -> Result<i64>) -> Result<()> {
        for (&namespace, n) in &self.added {
            if held(namespace)? + n > i64::from(self.limit) {
                return Err(StoreError::QuotaExceeded {
                    namespace: namespace.to_owned(),
                    limit: self.limit,
                });
            }
        }
        Ok(())
    }
}

/// Whether a token's previous secret is another token's current one, or
/// its own (the unique indexes cover current secrets, and previous ones
/// among themselves). Only tokens in a rotation's overlap have a previous
/// secret, so this is a probe per such token, whatever the size of the table.
pub(super) const SHARED_DIGEST: &str =
    "SELECT EXISTS (SELECT 1 FROM tokens a JOIN tokens b ON b.secret_sha256 = a.previous_sha256
                    WHERE a.previous_sha256 IS NOT NULL)";

/// One digest, one token: refuses (the caller's transaction is dropped, so
/// rolled back) a write after which [`SHARED_DIGEST`] found one shared.
pub(super) fn one_token_per_digest(shared: bool) -> Result<()> {
    if shared {
        return Err(StoreError::DigestTaken);
    }
    Ok(())
}

/// A unique index of the tokens table that a write ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Taken {
    /// `name`, the primary key.
    Name,
    /// `secret_sha256`, or `previous_sha256` (among previous secrets).
    Digest,
}

impl Taken {
    /// The answer about the tokens: `name` is the token whose name was
    /// taken.
    pub(super) fn error(self, name: &str) -> StoreError {
        match self {
            Self::Name => StoreError::NameTaken(name.to_owned()),
            Self::Digest => StoreError::DigestTaken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::record;
    use apitokens_core::Role;

    #[test]
    fn the_quota_counts_what_each_namespace_holds_and_gets() {
        let records = [
            record("namespaces/a/apitokens/x", Role::Owner, 1),
            record("namespaces/a/apitokens/y", Role::Owner, 2),
            record("namespaces/b/apitokens/x", Role::Owner, 3),
        ];
        let quota = Quota::new(&records, 3);
        assert_eq!(quota.namespaces(), ["a", "b"]);
        assert!(quota.check(|_| Ok(1)).is_ok(), "a: 1 + 2, b: 1 + 1");
        let err = quota.check(|ns| Ok(if ns == "a" { 2 } else { 0 })).unwrap_err();
        assert!(matches!(err, StoreError::QuotaExceeded { namespace, limit: 3 } if namespace == "a"));
    }
}
