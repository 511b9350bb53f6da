//! Durable token storage behind the [`Store`] interface. The embedded default
//! is SQLite in a file ([`SqliteStore`]); a shared SQL server can implement
//! the same trait to serve several control-plane replicas.
//!
//! Only SHA-256 digests of secrets are stored, never secrets.
//!
//! Every write is one transaction that advances the store's [`Revision`] and
//! records which tokens it changed, so that a control plane that has applied
//! revision R can ask for what changed since ([`Store::changes_since`]) and
//! apply just that: its own writes, another process's (`bootstrap`,
//! `import`) and another replica's alike.

mod sqlite;

pub use sqlite::SqliteStore;

use apitokens_core::compact::Lineage;
use apitokens_core::name::TokenName;
use apitokens_core::table::{Digest, Entry};
use apitokens_core::{Role, Timestamp};
use async_trait::async_trait;
use std::fmt;

/// The store's change counter: every write advances it by one, in every
/// process and replica sharing the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One token as stored: validated fields, the secret's digest only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// `namespaces/{namespace}/apitokens/{token}`, validated.
    pub name: String,
    pub role: Role,
    pub digest: Digest,
    pub create_time: Timestamp,
    pub expire_time: Option<Timestamp>,
    /// Expired long enough ago (see `serve --expired-retention`) to be left
    /// out of the configuration pushed to Envoy. Still listed by the API.
    pub retired: bool,
}

impl TokenRecord {
    pub fn namespace(&self) -> &str {
        TokenName::parse(&self.name).map_or("", |n| n.namespace)
    }

    /// The token as the filter's table holds it.
    pub fn entry(&self) -> Entry<'_> {
        Entry {
            name: &self.name,
            role: self.role,
            digest: self.digest,
            expire: self.expire_time,
        }
    }

    /// Checks the invariants the rest of the program relies on.
    pub(crate) fn check(&self) -> Result<(), String> {
        TokenName::parse(&self.name).map_err(|e| format!("name: {e}"))?;
        Ok(())
    }
}

/// What changed since a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// The store is at `revision`; `changed` holds the current state of every
    /// token written after the revision asked about (`None`: deleted).
    Since {
        revision: Revision,
        changed: Vec<(String, Option<TokenRecord>)>,
    },
    /// The change log no longer reaches back that far: load everything.
    TooOld,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A token with this name exists.
    #[error("an API token named {0} already exists")]
    NameTaken(String),
    /// A token with this digest exists (another secret collided, or an
    /// import carries the same secret twice).
    #[error("an API token with this secret digest already exists")]
    DigestTaken,
    /// The namespace already holds `limit` tokens.
    #[error("namespace {namespace} already has {limit} API tokens, the most allowed")]
    QuotaExceeded { namespace: String, limit: u32 },
    /// A stored row that cannot be read (written by something else, or
    /// damaged): named, never skipped.
    #[error("stored token {name} cannot be read: {problem}")]
    Corrupt { name: String, problem: String },
    /// The database cannot be used right now (down, locked, full); the
    /// message never contains a secret.
    #[error("the token store is unavailable: {0}")]
    Unavailable(String),
}

/// The storage interface. Every method that changes something is durable when
/// it returns `Ok`, and returns the revision it committed.
#[async_trait]
pub trait Store: Send + Sync {
    /// Inserts all records or none. With `quota`, refuses (and inserts
    /// nothing) if a namespace would then hold more than that many tokens.
    async fn insert(&self, records: Vec<TokenRecord>, quota: Option<u32>) -> Result<Revision, StoreError>;
    async fn get(&self, name: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// The namespace's tokens, ordered by name.
    async fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>, StoreError>;
    /// Replaces the digest of an existing token; `None` if there is none.
    async fn replace_digest(&self, name: &str, digest: Digest) -> Result<Option<(TokenRecord, Revision)>, StoreError>;
    /// `None` if there was no such token.
    async fn delete(&self, name: &str) -> Result<Option<Revision>, StoreError>;
    /// Every token that is not retired, ordered by name, and the revision
    /// they were read at, in one consistent read.
    async fn load(&self) -> Result<(Revision, Vec<TokenRecord>), StoreError>;
    /// What changed after `revision`, in one consistent read.
    async fn changes_since(&self, revision: Revision) -> Result<Changes, StoreError>;
    async fn revision(&self) -> Result<Revision, StoreError>;
    /// Retires every token whose expiry is at or before `cutoff`; the
    /// revision if any was.
    async fn retire_expired(&self, cutoff: Timestamp) -> Result<Option<Revision>, StoreError>;
    /// The earliest expiry among tokens that are not retired.
    async fn next_expiry(&self) -> Result<Option<Timestamp>, StoreError>;
    /// Identifies this store: the same for every process using it.
    fn lineage(&self) -> Lineage;
}
