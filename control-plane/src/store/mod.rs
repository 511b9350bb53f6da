//! Durable token storage behind the [`Store`] interface. The embedded default
//! is SQLite in a file ([`SqliteStore`]); PostgreSQL ([`PostgresStore`])
//! serves several control-plane replicas. [`Location`] is what `--store`
//! names.
//!
//! Only SHA-256 digests of secrets are stored, never secrets.
//!
//! Every write is one transaction that advances the store's [`Revision`] and
//! records which tokens it changed, so that a control plane that has applied
//! revision R can ask for what changed since ([`Store::changes_since`]) and
//! apply just that: its own writes, another process's (`bootstrap`,
//! `import`) and another replica's alike.
//!
//! Both backends follow the same rules, kept here once: what a write checks
//! (`checks`), the change log's bounds (`changes`), the rows' columns and
//! how a stored row reads (`row`), and what can go wrong (`error`). Every
//! call has a deadline (`deadline`); the contract both pass is `contract`.

mod changes;
mod checks;
#[cfg(test)]
pub(crate) mod contract;
mod deadline;
mod error;
mod postgres;
mod row;
pub use row::LAST_ADDRESSES;
mod sqlite;

pub use deadline::StoreMetrics;
pub use error::{Cause, Result, StoreError};
pub(crate) use postgres::replicas::{DbTime, ReplicaRow, Stale, StreamRow, StreamsWrite};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// The epoch and revision after [`Store::new_epoch`] on a store at `head`.
pub(crate) fn next_epoch(head: &Head) -> Position {
    let seen = head.behind.unwrap_or(head.at);
    Position::new(
        Epoch::after(head.at.epoch.max(seen.epoch)),
        Revision(head.at.revision.0.max(seen.revision.0) + 1),
    )
}

use apitokens_core::access::{Access, Kind};
use apitokens_core::compact::Lineage;
use apitokens_core::conditions::Packed;
use apitokens_core::name::TokenName;
use apitokens_core::table::{Digest, Entry, TokenEntries};
use apitokens_core::{Role, Timestamp};
use async_trait::async_trait;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

/// The store's change counter: every write advances it by one, in every
/// process and replica sharing the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

impl Revision {
    /// As the databases store it (a signed 64-bit integer).
    pub(crate) fn to_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    pub(crate) fn from_i64(stored: i64) -> Self {
        Self(u64::try_from(stored).unwrap_or(0))
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The store's history: milliseconds since the Unix epoch when it began,
/// i.e. when the store was created, or when an operator accepted it as it is
/// after a restore or a lossy failover (`apitokens new-epoch`, see
/// [`Store::new_epoch`]). A restored copy keeps the epoch of the moment it was
/// copied, so whatever the Envoys saw after that is recognisably newer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Epoch {
    /// As the databases store it (a signed 64-bit integer).
    pub(crate) fn to_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    pub(crate) fn from_i64(stored: i64) -> Self {
        Self(u64::try_from(stored).unwrap_or(0))
    }

    /// A new epoch, later than `after` (now, unless the clock is behind it).
    pub fn after(after: Epoch) -> Self {
        let now = crate::clock::now();
        let ms = u64::try_from(now.unix_seconds())
            .unwrap_or(0)
            .saturating_mul(1000)
            .saturating_add(u64::from(now.subsec_nanos() / 1_000_000));
        Self(ms.max(after.0.saturating_add(1)))
    }
}

/// A point in the store's history: an epoch, then a revision in it. Ordered:
/// every revision of a later epoch comes after every revision of an earlier
/// one. A configuration version is the position at which its content last
/// changed (`crate::config::Version`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub epoch: Epoch,
    pub revision: Revision,
}

impl Position {
    pub const fn new(epoch: Epoch, revision: Revision) -> Self {
        Self { epoch, revision }
    }
}

/// Where the store's history stands, read with the data it goes with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub at: Position,
    /// The newest position an Envoy (or a control plane) is known to have
    /// enforced beyond `at`: the store went back in time (a restored backup,
    /// a failover that lost commits). Writes are refused
    /// ([`StoreError::Behind`]) until an operator accepts the store as it is
    /// with [`Store::new_epoch`]; new writes would otherwise reuse revisions
    /// of the lost history.
    pub behind: Option<Position>,
}

impl Head {
    /// Whether `seen`, enforced somewhere, is beyond the store and beyond
    /// what it is already known to be behind: [`Store::mark_behind`] records
    /// it.
    pub(crate) fn is_behind(&self, seen: Position) -> bool {
        seen > self.at && self.behind.is_none_or(|b| seen > b)
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
    /// Expired long enough ago (see `serve --expired-retention-seconds`) to
    /// be left out of the configuration pushed to Envoy. Still listed.
    pub retired: bool,
    /// Who created it: the caller's token name, or the operator tool.
    pub created_by: Option<String>,
    /// The secret before the last regeneration, still accepted until then.
    pub previous: Option<PreviousSecret>,
    /// When one of its secrets last authenticated a request, to the minute
    /// (filled in by `get` and `list`).
    pub last_use: Option<Timestamp>,
    /// What its admitted requests did, by when (filled in by `get` and
    /// `list`).
    pub evidence: Evidence,
    /// The last client addresses it was seen from, with when, the latest
    /// first, at most five (filled in by `get` and `list`).
    pub last_addresses: Vec<(IpAddr, Timestamp)>,
    /// Suspended by an owner ([`Store::set_disabled`]): in the table every
    /// Envoy gets, and refused there, with everything else kept.
    pub disabled: bool,
    /// From when and from where it may be used (a not-before time, client
    /// address ranges), enforced by every filter; `None` without any.
    pub conditions: Option<Packed>,
    /// When it last changed (created, regenerated, disabled or enabled), to
    /// the second, as read from the store (a write sets it itself).
    pub update_time: Timestamp,
}

/// A token's use as the filters reported it: by the digest of the secret
/// that authenticated the request, with what its requests did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Use {
    pub name: String,
    pub digest: Digest,
    pub time: Timestamp,
    pub access: Access,
    /// Client addresses its requests came from (as the filters saw them,
    /// once per token per report interval).
    pub addresses: Vec<IpAddr>,
}

/// The evidence for least privilege: when a token's admitted requests last
/// did each kind of access, and last did what each role may not, to the
/// minute. One time per fact (not a log of requests): a window of any
/// length is a comparison, and a token's evidence is a handful of columns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    /// By [`Kind::ALL`]: read, write, tokens.
    pub kinds: [Option<Timestamp>; 3],
    /// By [`Role::ALL`]: a request that a viewer, an editor, an owner would
    /// have refused.
    pub refused_by: [Option<Timestamp>; 3],
    /// A use reported without what it did ([`Access::UNREPORTED`]): while
    /// one is in a window, the window's evidence is incomplete.
    pub unreported: Option<Timestamp>,
}

impl Evidence {
    /// The columns, in the stores' order.
    pub fn times(&self) -> [Option<Timestamp>; 7] {
        let [r, w, t] = self.kinds;
        let [v, e, o] = self.refused_by;
        [r, w, t, v, e, o, self.unreported]
    }

    pub fn from_times(times: [Option<Timestamp>; 7]) -> Self {
        let [r, w, t, v, e, o, u] = times;
        Self {
            kinds: [r, w, t],
            refused_by: [v, e, o],
            unreported: u,
        }
    }

    /// A use at `time` that did `access`.
    pub fn of_use(time: Timestamp, access: Access) -> Self {
        Self {
            kinds: Kind::ALL.map(|k| access.has(k).then_some(time)),
            refused_by: Role::ALL.map(|r| access.refusing().contains(r).then_some(time)),
            unreported: access.is_unreported().then_some(time),
        }
    }

    /// What was seen at `since` or later.
    pub fn since(&self, since: Timestamp) -> Access {
        let recent = |t: &Option<Timestamp>| t.is_some_and(|t| t >= since);
        let kinds = Kind::ALL
            .into_iter()
            .zip(&self.kinds)
            .filter(|(_, t)| recent(t))
            .fold(Access::NONE, |a, (k, _)| a.with_kind(k));
        let seen = Role::ALL
            .into_iter()
            .zip(&self.refused_by)
            .filter(|(_, t)| recent(t))
            .fold(kinds, |a, (r, _)| a.refused_by(r));
        if recent(&self.unreported) {
            seen.union(Access::UNREPORTED)
        } else {
            seen
        }
    }
}

/// A rotation's overlap: the previous secret's digest and its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreviousSecret {
    pub digest: Digest,
    pub until: Timestamp,
}

impl TokenRecord {
    pub fn namespace(&self) -> &str {
        TokenName::parse(&self.name).map_or("", |n| n.namespace)
    }

    /// The token as the filter's table holds it: its current secret and,
    /// during an overlap, its previous one, which never outlives the token.
    pub fn entries(&self) -> TokenEntries<'_> {
        let current = Entry {
            name: &self.name,
            role: self.role,
            digest: self.digest,
            expire: self.expire_time,
            previous: false,
            disabled: self.disabled,
            conditions: self.conditions.as_ref().map(Packed::view),
        };
        TokenEntries {
            current,
            previous: self.previous.map(|p| Entry {
                digest: p.digest,
                expire: Some(self.expire_time.map_or(p.until, |e| e.min(p.until))),
                previous: true,
                ..current
            }),
        }
    }
}

/// A token's new secret, by its digest ([`Store::replace_digest`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDigest {
    /// The token's name.
    pub name: String,
    pub digest: Digest,
    /// A rotation's overlap: the old digest stays the token's previous
    /// secret until then (ending any earlier overlap). `None`: the old
    /// digest is gone at once.
    pub previous_until: Option<Timestamp>,
}

/// What was done to a token, for the audit trail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Create,
    Regenerate,
    Delete,
    /// Tokens imported by digest (`apitokens import`): one event per
    /// namespace, with their number.
    Import,
    /// A token revoked because one of its secrets was reported leaked
    /// (`credentials:revoke`).
    Revoke,
    /// A warning that a token expires soon (`--expiry-warning`): no change.
    Expiring,
    /// Suspended: refused, kept.
    Disable,
    /// Restored after a disable, with the same secret.
    Enable,
    /// A namespace's inactivity policy set, or removed (`policy`).
    Inactivity,
    /// A token's conditions changed (`conditions`).
    Update,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Regenerate => "regenerate",
            Action::Delete => "delete",
            Action::Import => "import",
            Action::Revoke => "revoke",
            Action::Expiring => "expiring",
            Action::Disable => "disable",
            Action::Enable => "enable",
            Action::Inactivity => "inactivity",
            Action::Update => "update",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Action::Create,
            Action::Regenerate,
            Action::Delete,
            Action::Import,
            Action::Revoke,
            Action::Expiring,
            Action::Disable,
            Action::Enable,
            Action::Inactivity,
            Action::Update,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

/// Which of a token's secrets a caller used: its current one, or the
/// previous one during a rotation's overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential {
    Current,
    Previous,
}

impl Credential {
    pub fn as_str(self) -> &'static str {
        match self {
            Credential::Current => "current",
            Credential::Previous => "previous",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Credential::Current, Credential::Previous]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

/// One entry of the audit trail: who did what to which token, when, from
/// where. Never a secret or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub time: Timestamp,
    pub namespace: String,
    pub action: Action,
    /// The token's name (none for an import).
    pub token: Option<String>,
    /// The caller's token name, or the operator tool (`apitokens bootstrap`).
    pub actor: String,
    pub role: Option<Role>,
    pub expire_time: Option<Timestamp>,
    /// A regeneration's overlap: the previous secret works until then.
    pub previous_until: Option<Timestamp>,
    /// The client address: the `X-Forwarded-For` hop a trusted proxy
    /// (`--trusted-proxy`) appended, else the connection's peer.
    pub client_address: Option<String>,
    /// The connection's peer (the proxy, when one forwarded the call).
    pub peer_address: Option<String>,
    /// Which of the caller's secrets acted (none for an operator tool).
    pub credential: Option<Credential>,
    /// Tokens imported.
    pub count: Option<u32>,
    /// An inactivity policy set (`90d:disable`), or `off` when removed.
    pub policy: Option<String>,
    /// The token's conditions after a create or an update, as the API
    /// writes them (a JSON object; `{}`: none).
    pub conditions: Option<String>,
}

/// What [`Store::set_disabled`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateSet {
    /// The token after it (with its last use).
    pub token: TokenRecord,
    /// The revision that carries the token's state: the one committed, or,
    /// when the token was already in that state, the store's current one.
    pub revision: Revision,
    /// Whether anything was written (a revision, a change-log entry and the
    /// audit event); false when the token was already in that state.
    pub changed: bool,
}

/// A scan for expiry warnings: an `expiring` event by `actor` (at `now`)
/// for each token that expires within `lead` after `now`, but not within
/// `shorter` (whose own, later warning it gets instead), and was not
/// warned for this lead and this expiry yet: at most `limit`, soonest
/// first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpiryScan {
    pub now: Timestamp,
    pub lead: std::time::Duration,
    pub shorter: Option<std::time::Duration>,
    pub actor: &'static str,
    pub limit: u32,
}

/// The window of an expiry warning: the lead in whole seconds (the
/// warning's key), and the expiries in it, after `from` and up to `until`
/// (seconds, nanoseconds): after `now`, or after the end of the `shorter`
/// lead's window (whose warning such a token gets instead), and up to
/// `now + lead`. The same instant ends one window and starts the next.
pub(crate) struct WarningWindow {
    pub lead_seconds: i64,
    pub from: (i64, u32),
    pub until: (i64, u32),
}

pub(crate) fn warning_window(scan: &ExpiryScan) -> WarningWindow {
    let ExpiryScan { now, lead, shorter, .. } = *scan;
    let seconds = |d: std::time::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let after = |d: std::time::Duration| (now.unix_seconds().saturating_add(seconds(d)), now.subsec_nanos());
    WarningWindow {
        lead_seconds: seconds(lead),
        from: shorter.map_or((now.unix_seconds(), now.subsec_nanos()), after),
        until: after(lead),
    }
}

/// The `expiring` event of `token` at `now`.
pub(crate) fn expiring_event(token: &TokenRecord, now: Timestamp, actor: &str) -> AuditEvent {
    AuditEvent {
        conditions: None,
        policy: None,
        time: now,
        namespace: token.namespace().to_owned(),
        action: Action::Expiring,
        token: Some(token.name.clone()),
        actor: actor.to_owned(),
        role: Some(token.role),
        expire_time: token.expire_time,
        previous_until: None,
        client_address: None,
        peer_address: None,
        credential: None,
        count: None,
    }
}

/// What changed since a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// The store is at `head`; `changed` holds the current state of every
    /// token written after the revision asked about (`None`: deleted). Empty
    /// when the store is at or before that revision.
    Since {
        head: Head,
        changed: Vec<(String, Option<TokenRecord>)>,
    },
    /// The change log no longer reaches back that far: load everything.
    TooOld,
}

/// The storage interface. Every method that changes something is durable when
/// it returns `Ok`, and returns the revision it committed.
#[async_trait]
pub trait Store: Send + Sync {
    /// Inserts all records or none, and records `events` in the same
    /// transaction. With `quota`, refuses (and inserts nothing) if a
    /// namespace would then hold more than that many tokens.
    async fn insert(&self, records: Vec<TokenRecord>, quota: Option<u32>, events: Vec<AuditEvent>) -> Result<Revision>;
    /// With its last use.
    async fn get(&self, name: &str) -> Result<Option<TokenRecord>>;
    /// The namespace's tokens, ordered by name, with their last use.
    async fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>>;
    /// Replaces the digest of an existing token (see [`NewDigest`]); `None`
    /// if there is no such token.
    async fn replace_digest(&self, new: NewDigest, event: AuditEvent) -> Result<Option<(TokenRecord, Revision)>>;
    /// `None` if there was no such token.
    async fn delete(&self, name: &str, event: AuditEvent) -> Result<Option<Revision>>;
    /// Disables (`true`) or enables an existing token, with `event` and a
    /// change-log entry, in one transaction; `None` if there is no such
    /// token. A token already in that state is left as it is: no event, no
    /// revision ([`StateSet::changed`] false). Like every write, refused
    /// while the store is behind the gateways, even then.
    async fn set_disabled(&self, name: &str, disabled: bool, event: AuditEvent) -> Result<Option<StateSet>>;

    /// Sets a token's conditions to `new` if they are still `expected` and
    /// it is still the token created at `created` (compare-and-set: what the
    /// caller read and checked), with its audit event and a revision; its
    /// `update_time` stays (no activity). `changed` is false when nothing
    /// was written: the token's conditions are already `new`, or it is not
    /// what was read any more (the record tells which).
    async fn set_conditions(
        &self,
        name: &str,
        created: Timestamp,
        expected: Option<Packed>,
        new: Option<Packed>,
        event: AuditEvent,
    ) -> Result<Option<StateSet>>;

    /// Every namespace's own inactivity policy (`90d:disable`), as its
    /// owners set it.
    async fn inactivity_policies(&self) -> Result<Vec<(String, String)>>;

    /// Sets `namespace`'s inactivity policy (`None`: removes it), with its
    /// audit event in the same transaction; whether anything changed (the
    /// same policy again writes nothing, no event).
    async fn set_inactivity_policy(&self, namespace: &str, policy: Option<&str>, event: AuditEvent) -> Result<bool>;
    /// The latest use of each token named, recorded only while the token
    /// still has the secret that was used (current or previous): a use never
    /// lands on another token of the same name, created after a delete.
    /// Unknown names are skipped. Not a change of the configuration: no
    /// revision.
    async fn record_usage(&self, uses: Vec<Use>) -> Result<()>;
    /// The namespace's audit trail, newest first: at most `limit` events
    /// older than sequence number `before`, each with its sequence number.
    async fn events(&self, namespace: &str, before: Option<u64>, limit: u32) -> Result<Vec<(u64, AuditEvent)>>;
    /// Deletes audit events older than `before` (whole seconds), at most
    /// `limit` of them, oldest first; returns how many.
    async fn prune_events(&self, before: Timestamp, limit: u32) -> Result<u64>;
    /// The audit trail of every namespace after sequence number `after`,
    /// oldest first, at most `limit` events: the webhooks' outbox. The
    /// sequence follows the commits (every event is written under the
    /// store's write lock), so an event never appears behind one already
    /// read.
    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<(u64, AuditEvent)>>;
    /// Takes, or renews, the delivery lease of webhook `endpoint` for
    /// `holder` until `until_ms` (Unix milliseconds), when the lease is free,
    /// ran out before `now_ms`, or is `holder`'s already; answers the
    /// endpoint's cursor (the last event it acknowledged), `None` when
    /// another holder has the lease. An endpoint seen for the first time
    /// starts after the newest event.
    async fn claim_outbox(&self, endpoint: &str, holder: &str, now_ms: i64, until_ms: i64) -> Result<Option<u64>>;
    /// Moves `endpoint`'s cursor to `seq` (never back) if `holder` holds
    /// its lease; false when another holder took it.
    async fn advance_outbox(&self, endpoint: &str, holder: &str, seq: u64) -> Result<bool>;
    /// Records the expiry warnings `scan` finds due (see [`ExpiryScan`]);
    /// the events.
    async fn warn_expiring(&self, scan: ExpiryScan) -> Result<Vec<AuditEvent>>;
    /// Every token that is not retired, ordered by name, and where the store
    /// stood when they were read, in one consistent read.
    async fn load(&self) -> Result<(Head, Vec<TokenRecord>)>;
    /// What changed after `revision`, in one consistent read.
    async fn changes_since(&self, revision: Revision) -> Result<Changes>;
    async fn head(&self) -> Result<Head>;
    async fn revision(&self) -> Result<Revision> {
        Ok(self.head().await?.at.revision)
    }
    /// Records that `seen` was enforced somewhere although the store is
    /// before it (see [`Head::behind`]); nothing if the store is at or after
    /// `seen`. Returns the head after.
    async fn mark_behind(&self, seen: Position) -> Result<Head>;
    /// Accepts the store as it is after a restore or a lossy failover: a new
    /// epoch (later than the current one and than any position it is
    /// behind), a revision above every one seen, the change log restarted,
    /// and writes allowed again. Every Envoy then takes its content.
    async fn new_epoch(&self) -> Result<Head>;
    /// Retires every token whose expiry is at or before `cutoff`, and ends
    /// the overlaps that ended by then; the revision if anything changed.
    async fn retire_expired(&self, cutoff: Timestamp) -> Result<Option<Revision>>;
    /// The earliest expiry or end of an overlap among tokens that are not
    /// retired.
    async fn next_expiry(&self) -> Result<Option<Timestamp>>;
    /// Identifies this store: the same for every process using it.
    fn lineage(&self) -> Lineage;
    /// Changes (the value is a counter) soon after another process or
    /// replica commits a write, so the publisher applies it at once instead
    /// of at its next poll; `None`: no notifications (SQLite), poll only.
    /// Spawns its listener on the current tokio runtime at the first call.
    fn change_feed(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// Resolves at `feed`'s next change (see [`Store::change_feed`]); never
/// without a feed, or once its sender is gone.
pub(crate) async fn notified(feed: &mut Option<watch::Receiver<u64>>) {
    if let Some(rx) = feed {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Where the tokens are: `--store` (or `--db`, a SQLite file).
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    /// The URL as given: it may carry a password, so it is never shown
    /// (`Debug` and `Display` leave it out).
    Postgres(String),
}

impl Location {
    /// `postgres://...` or `postgresql://...`; `sqlite:PATH`; anything else
    /// is a SQLite file path.
    pub fn parse(text: &str) -> Self {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Self::Postgres(text.to_owned())
        } else {
            let path = text.strip_prefix("sqlite://").or_else(|| text.strip_prefix("sqlite:"));
            Self::Sqlite(PathBuf::from(path.unwrap_or(text)))
        }
    }

    /// Opens the store: a SQLite file is created if missing (`must_exist`:
    /// refused instead); PostgreSQL gets the migrations it lacks.
    pub async fn open(&self, must_exist: bool) -> Result<OpenStore> {
        Ok(match self {
            Self::Sqlite(path) if must_exist => OpenStore::Sqlite(Arc::new(SqliteStore::open_existing(path)?)),
            Self::Sqlite(path) => OpenStore::Sqlite(Arc::new(SqliteStore::open(path)?)),
            Self::Postgres(url) => OpenStore::Postgres(Arc::new(PostgresStore::connect(url).await?)),
        })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => path.display().fmt(f),
            Self::Postgres(_) => f.write_str("the PostgreSQL database"),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Location({self})")
    }
}

/// An opened store, as the command line uses it: any [`Store`], and for
/// PostgreSQL what replicas share beyond the tokens.
pub enum OpenStore {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PostgresStore>),
}

impl OpenStore {
    /// The store, each call within [`deadline::DEFAULT_CALL`].
    pub fn store(&self) -> Arc<dyn Store> {
        self.store_within(deadline::DEFAULT_CALL, deadline::StoreMetrics::default())
    }

    /// The store, each call within `call` (bulk reads and writes longer),
    /// timed into `metrics`.
    pub fn store_within(&self, call: std::time::Duration, metrics: deadline::StoreMetrics) -> Arc<dyn Store> {
        let inner = match self {
            Self::Sqlite(s) => Arc::clone(s) as Arc<dyn Store>,
            Self::Postgres(p) => Arc::clone(p) as Arc<dyn Store>,
        };
        Arc::new(deadline::Deadline::new(inner, call, metrics))
    }

    /// Where it is, for messages: the file, or the server without the
    /// password.
    pub fn describe_for(&self, location: &Location) -> String {
        match self {
            Self::Sqlite(_) => location.to_string(),
            Self::Postgres(p) => p.describe().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_and_what_they_show() {
        let pg = Location::parse("postgres://u:hunter2@db/tokens?sslmode=require");
        assert!(matches!(pg, Location::Postgres(_)));
        assert!(matches!(Location::parse("postgresql://db/x"), Location::Postgres(_)));
        assert_eq!(
            format!("{pg} {pg:?}"),
            "the PostgreSQL database Location(the PostgreSQL database)"
        );
        assert_eq!(
            Location::parse("sqlite:/var/x.db"),
            Location::Sqlite(PathBuf::from("/var/x.db"))
        );
        assert_eq!(
            Location::parse("sqlite:///var/x.db"),
            Location::Sqlite(PathBuf::from("/var/x.db"))
        );
        assert_eq!(
            Location::parse("apitokens.db"),
            Location::Sqlite(PathBuf::from("apitokens.db"))
        );
    }
}
