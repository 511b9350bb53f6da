//! What every Envoy should enforce now: the filter configuration built from
//! the store, kept in memory as the compact table and the changes staged
//! since it was last written ([`Publisher`]), published at every change as a
//! versioned [`Snapshot`] (what the API checks its callers with) and each
//! change as an element of a [`history::History`] for the filter VMs' delta
//! channel. The table is written ([`Encoded`], what ECDS pushes) only when an
//! Envoy or the ECDS file needs it, and in the background.

pub mod history;
mod publisher;

pub use history::{Element, Reach};
pub use publisher::{CatchUp, PublishError, Publisher, PublisherOptions};

use crate::store::{Epoch, Position, Revision};
use apitokens_core::compact::Stamp;
use apitokens_core::table::{Digest, Overlay, Token};
use apitokens_core::{Config, Denial, Timestamp};
use std::fmt;
use std::sync::Arc;

/// A configuration version: the store position (epoch, revision) at which
/// the configuration's content last changed. Every replica on one store
/// therefore gives the same content the same version, and versions only
/// increase, across epochs too. Shown as its revision number (the epoch is
/// shown beside it where it matters).
pub type Version = Position;

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.revision.fmt(f)
    }
}

impl Position {
    /// A version number as a caller writes it (`/status?version=N`).
    pub fn parse_number(text: &str) -> Option<Revision> {
        text.parse().ok().map(Revision)
    }

    /// The version as an xDS `version_info` (`EPOCH.REVISION`), which Envoy
    /// repeats in its ACKs and reports when it reconnects.
    pub fn xds(&self) -> String {
        format!("{}.{}", self.epoch, self.revision)
    }

    /// A `version_info` an Envoy reports: ours, or a bare number from before
    /// epochs (epoch 0, older than every epoch). `None` for anything else
    /// (an empty one: a fresh Envoy).
    pub fn from_xds(text: &str) -> Option<Self> {
        let (epoch, revision) = text.split_once('.').unwrap_or(("0", text));
        Some(Self::new(Epoch(epoch.parse().ok()?), Revision(revision.parse().ok()?)))
    }

    /// The stamp of the table the filter receives.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            epoch: self.epoch.0,
            generation: self.revision.0,
        }
    }
}

/// One published configuration, as the API sees it: current at every
/// change.
#[derive(Debug)]
pub struct Snapshot {
    pub version: Version,
    /// The table as last written and the built-in rules (the token API's
    /// own permissions cannot be configured away).
    api: Arc<Config>,
    /// The changes since the table was written, looked up first (as the
    /// filter looks up the delta channel's).
    staged: Overlay,
    pub tokens: usize,
    pub published_at: Timestamp,
}

impl Snapshot {
    pub(crate) fn new(version: Version, api: Arc<Config>, staged: Overlay, tokens: usize) -> Self {
        Self {
            version,
            api,
            staged,
            tokens,
            published_at: crate::clock::now(),
        }
    }

    /// The settings and rules (for a denial's answer, a decision).
    pub fn api(&self) -> &Config {
        &self.api
    }

    /// The filter's authentication of an `Authorization` value.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        now: impl FnOnce() -> Option<Timestamp>,
    ) -> Result<Token<'_>, (Denial, Option<Token<'_>>)> {
        self.api.authenticate(Some(&self.staged), authorization, now)
    }

    /// The token whose secret has this digest.
    pub fn token(&self, digest: &Digest) -> Option<Token<'_>> {
        self.staged.get(self.api.tokens(), digest)
    }
}

/// A configuration as Envoy receives it: the plugin configuration in the
/// compact encoding (digests only), written from the table and the staged
/// changes, pushed to every Envoy: shared, never copied per Envoy.
#[derive(Debug)]
pub struct Encoded {
    /// The [`Snapshot`] version it carries.
    pub version: Version,
    pub payload: Arc<Vec<u8>>,
    pub tokens: usize,
}

/// The publisher's state as writers and the status page see it.
#[derive(Clone, Debug)]
pub struct Published {
    /// Every store change up to this revision is in `snapshot`.
    pub revision: Revision,
    /// The store's epoch at `revision`.
    pub epoch: Epoch,
    /// The store is behind what was enforced (see `store::Head::behind`):
    /// the newest version seen. Writes are refused, nothing older than it is
    /// sent to an Envoy that has it.
    pub behind: Option<Version>,
    pub snapshot: Arc<Snapshot>,
    /// The last configuration written for Envoy: `snapshot`'s version, or an
    /// earlier one until an Envoy, the ECDS file or the background writer
    /// needs it ([`Publisher::encoded`]).
    pub encoded: Arc<Encoded>,
    /// Why the last attempt to catch up with the store failed, if it did (the
    /// previous snapshot stays in force; the next attempt comes with the next
    /// write or poll).
    pub error: Option<String>,
}
