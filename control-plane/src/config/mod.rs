//! What every Envoy should enforce now: the filter configuration built from
//! the store, kept in memory as the compact table and edited per change
//! ([`Publisher`]), published as versioned [`Snapshot`]s for the push.

mod publisher;

pub use publisher::{PublishError, Publisher, PublisherOptions};

use crate::store::Revision;
use apitokens_core::{Config, Timestamp};
use std::fmt;
use std::sync::Arc;

/// A configuration version: the store revision at which the configuration's
/// content last changed. Every replica on one store therefore gives the same
/// content the same version, and versions only increase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64);

impl From<Revision> for Version {
    fn from(r: Revision) -> Self {
        Self(r.0)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Version {
    /// The version as an xDS `version_info`, which a stream's ACK repeats.
    pub fn parse(text: &str) -> Option<Self> {
        text.parse().ok().map(Self)
    }
}

/// One published configuration.
#[derive(Debug)]
pub struct Snapshot {
    pub version: Version,
    /// The plugin configuration in the compact encoding (digests only), as
    /// pushed to every Envoy: shared, never copied per Envoy.
    pub payload: Arc<Vec<u8>>,
    /// What the API checks its callers with: the same table, the built-in
    /// rules (the token API's own permissions cannot be configured away).
    pub api: Arc<Config>,
    pub tokens: usize,
    pub published_at: Timestamp,
}

/// The publisher's state as writers and the status page see it.
#[derive(Debug)]
pub struct Published {
    /// Every store change up to this revision is in `snapshot`.
    pub revision: Revision,
    pub snapshot: Arc<Snapshot>,
    /// Why the last attempt to catch up with the store failed, if it did (the
    /// previous snapshot stays in force; the next attempt comes with the next
    /// write or poll).
    pub error: Option<String>,
}
