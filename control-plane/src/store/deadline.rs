//! Every store call has a deadline. A database server that freezes with its
//! connections open (a stopped process, a hung storage volume, a VM paused
//! for migration) keeps the kernel answering TCP, so neither keepalives nor
//! the server's `statement_timeout` end the wait: without a deadline each
//! request would hang for as long as the server does. A call past its
//! deadline answers 503 with `Retry-After`; its transaction is dropped,
//! which rolls it back when the server answers again (only a commit already
//! on the wire can still land: the answer says the outcome is unknown).

use super::{
    AuditEvent, Cause, Changes, ExpiryScan, Head, NewDigest, Position, Result, Revision, StateSet, Store, StoreError,
    TokenRecord, Use,
};
use apitokens_core::compact::Lineage;
use apitokens_core::conditions::Packed;
use apitokens_core::Timestamp;
use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    metrics: StoreMetrics,
}

/// How long store calls take and which fail (`/metrics`), by operation.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    pub seconds: Family<OpLabel, Histogram, fn() -> Histogram>,
    pub errors: Family<ErrorLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    operation: &'static str,
    /// `timeout` (no answer within the deadline), `unavailable` (the
    /// database refused or is down), `corrupt`, `behind`.
    kind: &'static str,
}

fn call_buckets() -> Histogram {
    // 0.5 ms (SQLite) to about 16 s (past the default deadline, 10 s).
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for StoreMetrics {
    fn default() -> Self {
        let metrics = Self {
            seconds: Family::new_with_constructor(call_buckets),
            errors: Family::default(),
        };
        // Zeros from the start for the failures worth an alert: a series
        // that appears only with its first error cannot be rated.
        for Op(operation, _) in ALL {
            for kind in ["timeout", "unavailable"] {
                let _ = metrics.errors.get_or_create(&ErrorLabels { operation, kind });
            }
        }
        metrics
    }
}

/// A store call: its label on `/metrics` and its name in messages.
struct Op(&'static str, &'static str);

const INSERT: Op = Op("insert", "an insert");
const GET: Op = Op("get", "a read");
const LIST: Op = Op("list", "a list");
const REPLACE: Op = Op("replace_digest", "a regeneration");
const DELETE: Op = Op("delete", "a delete");
const SET_DISABLED: Op = Op("set_disabled", "a disable or enable");
const INACTIVITY_POLICIES: Op = Op("inactivity_policies", "a read of the inactivity policies");
const SET_CONDITIONS: Op = Op("set_conditions", "a change of a token's conditions");
const SET_INACTIVITY_POLICY: Op = Op("set_inactivity_policy", "an inactivity policy change");
const USAGE: Op = Op("record_usage", "a usage write");
const EVENTS: Op = Op("events", "an audit read");
const PRUNE: Op = Op("prune_events", "an audit pruning");
const LOAD: Op = Op("load", "a load of every token");
const CHANGES: Op = Op("changes_since", "a read of the changes");
const HEAD: Op = Op("head", "a read of the head");
const MARK: Op = Op("mark_behind", "a mark of a newer position");
const EPOCH: Op = Op("new_epoch", "a new epoch");
const RETIRE: Op = Op("retire_expired", "retiring expired tokens");
const NEXT_EXPIRY: Op = Op("next_expiry", "a read of the next expiry");
const EVENTS_AFTER: Op = Op("events_after", "a read of the outbox");
const CLAIM: Op = Op("claim_outbox", "a webhook lease");
const ADVANCE: Op = Op("advance_outbox", "a webhook cursor's move");
const WARN: Op = Op("warn_expiring", "expiry warnings");
const ALL: [Op; 20] = [
    INSERT,
    GET,
    LIST,
    REPLACE,
    DELETE,
    SET_DISABLED,
    USAGE,
    EVENTS,
    PRUNE,
    LOAD,
    CHANGES,
    HEAD,
    MARK,
    EPOCH,
    RETIRE,
    NEXT_EXPIRY,
    EVENTS_AFTER,
    CLAIM,
    ADVANCE,
    WARN,
];

impl Deadline {
    pub fn new(inner: Arc<dyn Store>, call: Duration, metrics: StoreMetrics) -> Self {
        Self { inner, call, metrics }
    }

    async fn within<T>(
        &self,
        limit: Duration,
        Op(operation, what): Op,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let (result, failure) = match tokio::time::timeout(limit, call).await {
            Ok(result) => {
                let failure = match &result {
                    Err(StoreError::Unavailable(_)) => Some("unavailable"),
                    Err(StoreError::Corrupt { .. }) => Some("corrupt"),
                    Err(StoreError::Behind { .. }) => Some("behind"),
                    // Answers about the tokens (a name taken, a full
                    // namespace), not failures of the store.
                    Ok(_)
                    | Err(StoreError::NameTaken(_) | StoreError::DigestTaken | StoreError::QuotaExceeded { .. }) => {
                        None
                    }
                };
                (result, failure)
            }
            Err(_) => {
                tracing::warn!(
                    "store: no answer to {what} within {} ms: the database is frozen or unreachable",
                    limit.as_millis()
                );
                let e = StoreError::Unavailable(Cause::NoAnswer {
                    to: what,
                    within: limit,
                });
                (Err(e), Some("timeout"))
            }
        };
        self.metrics
            .seconds
            .get_or_create(&OpLabel { operation })
            .observe(started.elapsed().as_secs_f64());
        if let Some(kind) = failure {
            self.metrics
                .errors
                .get_or_create(&ErrorLabels { operation, kind })
                .inc();
        }
        result
    }
}

#[async_trait]
impl Store for Deadline {
    async fn insert(&self, records: Vec<TokenRecord>, quota: Option<u32>, events: Vec<AuditEvent>) -> Result<Revision> {
        let limit = if records.len() > BULK_RECORDS { BULK } else { self.call };
        self.within(limit, INSERT, self.inner.insert(records, quota, events))
            .await
    }
    async fn get(&self, name: &str) -> Result<Option<TokenRecord>> {
        self.within(self.call, GET, self.inner.get(name)).await
    }
    async fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>> {
        self.within(self.call, LIST, self.inner.list(namespace)).await
    }
    async fn replace_digest(&self, new: NewDigest, event: AuditEvent) -> Result<Option<(TokenRecord, Revision)>> {
        self.within(self.call, REPLACE, self.inner.replace_digest(new, event))
            .await
    }
    async fn delete(&self, name: &str, event: AuditEvent) -> Result<Option<Revision>> {
        self.within(self.call, DELETE, self.inner.delete(name, event)).await
    }
    async fn set_disabled(&self, name: &str, disabled: bool, event: AuditEvent) -> Result<Option<StateSet>> {
        let call = self.inner.set_disabled(name, disabled, event);
        self.within(self.call, SET_DISABLED, call).await
    }
    async fn inactivity_policies(&self) -> Result<Vec<(String, String)>> {
        self.within(self.call, INACTIVITY_POLICIES, self.inner.inactivity_policies())
            .await
    }
    async fn set_inactivity_policy(&self, namespace: &str, policy: Option<&str>, event: AuditEvent) -> Result<bool> {
        let call = self.inner.set_inactivity_policy(namespace, policy, event);
        self.within(self.call, SET_INACTIVITY_POLICY, call).await
    }
    async fn set_conditions(
        &self,
        name: &str,
        created: Timestamp,
        expected: Option<Packed>,
        new: Option<Packed>,
        event: AuditEvent,
    ) -> Result<Option<StateSet>> {
        let call = self.inner.set_conditions(name, created, expected, new, event);
        self.within(self.call, SET_CONDITIONS, call).await
    }
    async fn record_usage(&self, uses: Vec<Use>) -> Result<()> {
        self.within(self.call, USAGE, self.inner.record_usage(uses)).await
    }
    async fn events(&self, namespace: &str, before: Option<u64>, limit: u32) -> Result<Vec<(u64, AuditEvent)>> {
        let call = self.inner.events(namespace, before, limit);
        self.within(self.call, EVENTS, call).await
    }
    async fn prune_events(&self, before: Timestamp, limit: u32) -> Result<u64> {
        self.within(BULK, PRUNE, self.inner.prune_events(before, limit)).await
    }
    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<(u64, AuditEvent)>> {
        self.within(self.call, EVENTS_AFTER, self.inner.events_after(after, limit))
            .await
    }
    async fn claim_outbox(&self, endpoint: &str, holder: &str, now_ms: i64, until_ms: i64) -> Result<Option<u64>> {
        self.within(
            self.call,
            CLAIM,
            self.inner.claim_outbox(endpoint, holder, now_ms, until_ms),
        )
        .await
    }
    async fn advance_outbox(&self, endpoint: &str, holder: &str, seq: u64) -> Result<bool> {
        self.within(self.call, ADVANCE, self.inner.advance_outbox(endpoint, holder, seq))
            .await
    }
    async fn warn_expiring(&self, scan: ExpiryScan) -> Result<Vec<AuditEvent>> {
        self.within(BULK, WARN, self.inner.warn_expiring(scan)).await
    }
    async fn load(&self) -> Result<(Head, Vec<TokenRecord>)> {
        self.within(BULK, LOAD, self.inner.load()).await
    }
    async fn changes_since(&self, revision: Revision) -> Result<Changes> {
        self.within(self.call, CHANGES, self.inner.changes_since(revision))
            .await
    }
    async fn head(&self) -> Result<Head> {
        self.within(self.call, HEAD, self.inner.head()).await
    }
    async fn mark_behind(&self, seen: Position) -> Result<Head> {
        self.within(self.call, MARK, self.inner.mark_behind(seen)).await
    }
    async fn new_epoch(&self) -> Result<Head> {
        self.within(BULK, EPOCH, self.inner.new_epoch()).await
    }
    async fn retire_expired(&self, cutoff: Timestamp) -> Result<Option<Revision>> {
        self.within(self.call, RETIRE, self.inner.retire_expired(cutoff)).await
    }
    async fn next_expiry(&self) -> Result<Option<Timestamp>> {
        self.within(self.call, NEXT_EXPIRY, self.inner.next_expiry()).await
    }
    fn lineage(&self) -> Lineage {
        self.inner.lineage()
    }
    fn change_feed(&self) -> Option<watch::Receiver<u64>> {
        self.inner.change_feed()
    }
}
