//! Every store call has a deadline. A database server that freezes with its
//! connections open (a stopped process, a hung storage volume, a VM paused
//! for migration) keeps the kernel answering TCP, so neither keepalives nor
//! the server's `statement_timeout` end the wait: without a deadline each
//! request would hang for as long as the server does. A call past its
//! deadline answers 503 with `Retry-After`; its transaction is dropped,
//! which rolls it back when the server answers again (only a commit already
//! on the wire can still land: the answer says the outcome is unknown).

use super::{AuditEvent, Changes, Head, Position, Revision, Store, StoreError, TokenRecord, Use};
use apitokens_core::compact::Lineage;
use apitokens_core::Timestamp;
use async_trait::async_trait;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A default that no healthy database comes near: calls take milliseconds.
pub const DEFAULT_CALL: Duration = Duration::from_secs(10);
/// Reading or writing every token (a start, an import) takes longer at
/// scale: 1M tokens load in seconds.
const BULK: Duration = Duration::from_secs(300);
/// An insert of more records than this (an import) is bulk.
const BULK_RECORDS: usize = 1000;

pub struct Deadline {
    inner: Arc<dyn Store>,
    call: Duration,
}

impl Deadline {
    pub fn new(inner: Arc<dyn Store>, call: Duration) -> Self {
        Self { inner, call }
    }

    async fn within<T>(
        &self,
        limit: Duration,
        what: &str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    "store: no answer to {what} within {} ms: the database is frozen or unreachable",
                    limit.as_millis()
                );
                Err(StoreError::Unavailable(format!(
                    "no answer from the database to {what} within {} ms (a change may or may not have been made)",
                    limit.as_millis()
                )))
            }
        }
    }
}

#[async_trait]
impl Store for Deadline {
    async fn insert(
        &self,
        records: Vec<TokenRecord>,
        quota: Option<u32>,
        events: Vec<AuditEvent>,
    ) -> Result<Revision, StoreError> {
        let limit = if records.len() > BULK_RECORDS { BULK } else { self.call };
        self.within(limit, "an insert", self.inner.insert(records, quota, events))
            .await
    }
    async fn get(&self, name: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.within(self.call, "a read", self.inner.get(name)).await
    }
    async fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>, StoreError> {
        self.within(self.call, "a list", self.inner.list(namespace)).await
    }
    async fn replace_digest(
        &self,
        name: &str,
        digest: apitokens_core::table::Digest,
        previous_until: Option<Timestamp>,
        event: AuditEvent,
    ) -> Result<Option<(TokenRecord, Revision)>, StoreError> {
        let call = self.inner.replace_digest(name, digest, previous_until, event);
        self.within(self.call, "a regeneration", call).await
    }
    async fn delete(&self, name: &str, event: AuditEvent) -> Result<Option<Revision>, StoreError> {
        self.within(self.call, "a delete", self.inner.delete(name, event)).await
    }
    async fn record_usage(&self, uses: Vec<Use>) -> Result<(), StoreError> {
        self.within(self.call, "a usage write", self.inner.record_usage(uses))
            .await
    }
    async fn events(
        &self,
        namespace: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, AuditEvent)>, StoreError> {
        let call = self.inner.events(namespace, before, limit);
        self.within(self.call, "an audit read", call).await
    }
    async fn prune_events(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        self.within(BULK, "an audit pruning", self.inner.prune_events(before, limit))
            .await
    }
    async fn load(&self) -> Result<(Head, Vec<TokenRecord>), StoreError> {
        self.within(BULK, "a load of every token", self.inner.load()).await
    }
    async fn changes_since(&self, revision: Revision) -> Result<Changes, StoreError> {
        self.within(self.call, "a read of the changes", self.inner.changes_since(revision))
            .await
    }
    async fn head(&self) -> Result<Head, StoreError> {
        self.within(self.call, "a read of the head", self.inner.head()).await
    }
    async fn mark_behind(&self, seen: Position) -> Result<Head, StoreError> {
        self.within(self.call, "a mark of a newer position", self.inner.mark_behind(seen))
            .await
    }
    async fn new_epoch(&self) -> Result<Head, StoreError> {
        self.within(BULK, "a new epoch", self.inner.new_epoch()).await
    }
    async fn retire_expired(&self, cutoff: Timestamp) -> Result<Option<Revision>, StoreError> {
        self.within(self.call, "retiring expired tokens", self.inner.retire_expired(cutoff))
            .await
    }
    async fn next_expiry(&self) -> Result<Option<Timestamp>, StoreError> {
        self.within(self.call, "a read of the next expiry", self.inner.next_expiry())
            .await
    }
    fn lineage(&self) -> Lineage {
        self.inner.lineage()
    }
    fn change_feed(&self) -> Option<watch::Receiver<u64>> {
        self.inner.change_feed()
    }
}
