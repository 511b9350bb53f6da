//! The publisher: keeps the configuration Envoy enforces in memory as the
//! compact token table, applies each batch of store changes to it, and
//! publishes a new [`Snapshot`] when the content changed.
//!
//! Writes coalesce (group commit): a write commits to the store, then asks
//! for its revision to be published; one writer at a time asks the store
//! what changed since the revision the table has and applies all of it in
//! one edit, and the writers whose commits that covered answer at once, so a
//! burst of writes costs one edit and one push per round, not one per write. Changes made by
//! other processes (`bootstrap`, `import`, another replica) arrive the same
//! way, through the poll. A restart, or a change log that no longer reaches
//! back far enough, loads the whole table from the store.
//!
//! A catch-up does not write the compact table (a copy of 86 MB at a
//! million tokens): it stages the changes ([`LiveTable::stage`]) and
//! publishes a [`Snapshot`] whose lookups see them, as the filter's VMs see
//! the delta channel's. The table is written with the staged changes
//! ([`Publisher::encoded`]) when an Envoy on ECDS alone, a new ECDS
//! subscription or the ECDS file needs the current version, every
//! `snapshot_interval` in the background (the snapshots Envoys on the delta
//! channel get), and when [`STAGED_MAX`] tokens are staged.
//!
//! Expired tokens stay in the table (the filter refuses them itself, to the
//! second) until they have been expired for the retention period; then the
//! publisher retires them in the store, a write like any other, so every
//! replica drops them at the same revision.
//!
//! Each catch-up also records what it applied as one step of the
//! [`History`] the delta channel serves to filter VMs: the records it read
//! from the store, encoded once, here, never per VM (a few records per
//! write: nothing next to the edit of the table). A VM before the history is
//! served from the store's change log ([`Publisher::catch_up_from`]), one
//! read per position however many VMs ask for it.

use super::history::{self, Element, History, Reach};
use super::{Encoded, Published, Snapshot, Version};
use crate::clock::{self, Clock};
use crate::store::{Changes, Epoch, Head, Position, Revision, Store, StoreError, TokenRecord};
use apitokens_core::compact::{self, Lineage};
use apitokens_core::error::ConfigError;
use apitokens_core::spec::PluginConfig;
use apitokens_core::table::{Change, LiveTable, Staged};
use apitokens_core::{Config, Timestamp};
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Mutex, Notify};

#[derive(Clone, Debug, Default)]
pub struct PublisherOptions {
    /// Everything but the tokens: realm, rules, identity headers, ...
    pub base: PluginConfig,
    /// How long an expired token stays in the pushed table (counted by the
    /// filter as `expired` rather than `unknown`) before it is retired.
    pub expired_retention: Duration,
    /// How often the table is written with the staged changes in the
    /// background (zero: only when needed).
    pub snapshot_interval: Duration,
    /// What expired tokens' retention is measured against (and the API's
    /// expiry checks: [`Publisher::clock`]).
    pub clock: Clock,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store's tokens do not make a table the filter would accept.
    #[error("the stored tokens do not make a valid configuration: {0}")]
    Table(#[from] ConfigError),
    #[error("the publisher task failed: {0}")]
    Task(String),
    #[error("timed out")]
    TimedOut,
}

pub struct Publisher {
    store: Arc<dyn Store>,
    /// The compact encoding's header: settings and lineage, fixed for the
    /// life of the process.
    header: Arc<Vec<u8>>,
    /// The API's settings: the realm, the built-in rules.
    api_settings: PluginConfig,
    retention: Duration,
    snapshot_interval: Duration,
    clock: Clock,
    /// Where the publisher is in the store; held through a catch-up, store
    /// reads included.
    live: Mutex<Live>,
    /// The table; held for a catch-up's edit and publication only, never
    /// over a store read, so that an Envoy that needs the table written
    /// gets it while the store does not answer (a replica cut off from its
    /// database still serves what it has, and holds the streams of Envoys
    /// that are ahead of it).
    tables: Mutex<Tables>,
    /// The table may not be what was published (an edit failed halfway, a
    /// write of it failed): the next catch-up reloads it from the store.
    reload: AtomicBool,
    /// One write of the table at a time.
    flushing: Mutex<()>,
    /// Too many changes are staged: the background writes the table.
    flush_wanted: Notify,
    published: watch::Sender<Arc<Published>>,
    /// The steps of the delta channel, updated before each publication
    /// (so a stream woken by one finds its step). Held for microseconds.
    history: std::sync::Mutex<History>,
    /// Catch-ups read from the store's change log for VMs before the
    /// history, by the position they start at (`None`: too large, a
    /// snapshot is needed): the VMs of one Envoy (and of Envoys configured
    /// alike) ask for the same one. Valid forever (a step's records are the
    /// final states at its end); the latest few are kept, and one read runs
    /// at a time.
    catch_ups: Mutex<VecDeque<(Position, Option<Arc<Element>>)>>,
}

/// What a VM before the history gets from the store (see
/// [`Publisher::catch_up_from`]).
#[derive(Debug)]
pub enum CatchUp {
    /// The step from its table to the store's head.
    Step(Arc<Element>),
    /// The store's head is at or before its table: nothing to send yet.
    Nothing,
    /// The change log does not reach back to its table, or the store is in
    /// another epoch: only a snapshot helps.
    SnapshotNeeded,
}

/// Store catch-ups kept.
const CATCH_UPS: usize = 8;
/// The most a catch-up from the store may carry; a VM further behind gets
/// a snapshot instead (the filter takes at most 64 MiB of chunks at once).
const MAX_CATCH_UP_BYTES: usize = 32 << 20;

struct Live {
    epoch: Epoch,
    revision: Revision,
    next_expiry: Option<Timestamp>,
}

struct Tables {
    /// `None` only while an edit runs off the async threads (or after it
    /// failed: then `reload` is set).
    table: Option<LiveTable>,
    /// Counts reloads: a write of the table prepared before one is of no use.
    generation: u64,
    /// The API's configuration over the table as last written.
    api: Arc<Config>,
    /// Payloads of earlier snapshots, reused for the next write once no
    /// stream or request holds them (a fresh buffer of a large table costs
    /// more in page faults than the copy itself).
    spare: Vec<Arc<Vec<u8>>>,
}

/// Spare payloads kept for reuse.
const SPARES: usize = 2;

/// The most tokens staged before the table is written in the background:
/// every catch-up publishes a copy of what is staged (a few hundred
/// microseconds at this size), and a VM's snapshot is a table without them.
pub const STAGED_MAX: usize = 2048;

impl Publisher {
    /// Loads the store and publishes the first snapshot.
    /// The clock expiry is measured against, here and in the API.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub async fn open(store: Arc<dyn Store>, opts: PublisherOptions) -> Result<Arc<Self>, PublishError> {
        // The filter's own validation of the settings.
        let header = Arc::new(compact::header(&opts.base, &store.lineage())?);
        let api_settings = PluginConfig {
            realm: opts.base.realm.clone(),
            ..PluginConfig::default()
        };
        let (head, records) = store.load().await?;
        let table = build(stamped(&header, head.at), records).await?;
        let next_expiry = store.next_expiry().await?;
        let spare = spares(table.table().buffer().len()).await;
        let api = api_config(&api_settings, &table)?;
        let snapshot = Arc::new(Snapshot::new(
            head.at,
            Arc::clone(&api),
            table.staged().clone(),
            table.len(),
        ));
        let encoded = encoded_table(head.at, &table);
        tracing::info!(
            "configuration version {} (epoch {}) loaded ({} tokens)",
            snapshot.version,
            head.at.epoch,
            snapshot.tokens
        );
        if let Some(seen) = head.behind {
            tracing::error!("{}", StoreError::Behind { at: head.at, seen });
        }
        let revision = head.at.revision;
        let history = History::new(head.at, snapshot.version);
        let (published, _) = watch::channel(Arc::new(Published {
            revision,
            epoch: head.at.epoch,
            behind: head.behind,
            snapshot,
            encoded,
            error: None,
        }));
        Ok(Arc::new(Self {
            store,
            header,
            api_settings,
            retention: opts.expired_retention,
            snapshot_interval: opts.snapshot_interval,
            clock: opts.clock,
            live: Mutex::new(Live {
                epoch: head.at.epoch,
                revision,
                next_expiry,
            }),
            tables: Mutex::new(Tables {
                table: Some(table),
                generation: 0,
                api,
                spare,
            }),
            reload: AtomicBool::new(false),
            published,
            flushing: Mutex::new(()),
            flush_wanted: Notify::new(),
            history: std::sync::Mutex::new(history),
            catch_ups: Mutex::new(VecDeque::new()),
        }))
    }

    /// The store's lineage: what a VM's table must come from.
    pub fn lineage(&self) -> Lineage {
        self.store.lineage()
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        // Plain data, replaced whole or pushed to: usable after a panic.
        self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What a VM whose table is at `at` needs from the history.
    pub fn delta_since(&self, at: Position) -> Reach {
        self.history().since(at)
    }

    /// The step from `at` (before the history, in the store's epoch) to the
    /// store's head, read from its change log. One read at a time, and the
    /// latest few kept: the VMs that ask next for the same position share it.
    pub async fn catch_up_from(&self, at: Position) -> Result<CatchUp, PublishError> {
        let mut cache = self.catch_ups.lock().await;
        if let Some((_, step)) = cache.iter().find(|(from, _)| *from == at) {
            return Ok(step
                .as_ref()
                .map_or(CatchUp::SnapshotNeeded, |s| CatchUp::Step(Arc::clone(s))));
        }
        let (head, changed) = match self.store.changes_since(at.revision).await? {
            Changes::TooOld => return Ok(CatchUp::SnapshotNeeded),
            Changes::Since { head, changed } => (head, changed),
        };
        if head.at.epoch != at.epoch {
            return Ok(CatchUp::SnapshotNeeded);
        }
        if head.at <= at {
            return Ok(CatchUp::Nothing);
        }
        let chunks = tokio::task::spawn_blocking(move || history::encode_records(&changed))
            .await
            .map_err(|e| PublishError::Task(e.to_string()))?;
        let step = Arc::new(Element {
            from: at,
            to: head.at,
            chunks,
            // What the VM's table held at `at` is not known here.
            revokes: true,
        });
        let step = (step.bytes() <= MAX_CATCH_UP_BYTES).then_some(step);
        cache.push_back((at, step.clone()));
        if cache.len() > CATCH_UPS {
            cache.pop_front();
        }
        Ok(step.map_or(CatchUp::SnapshotNeeded, CatchUp::Step))
    }

    pub fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.published.borrow().snapshot)
    }

    /// The configuration last written for Envoy (perhaps before the current
    /// version: see [`Publisher::encoded`]).
    pub fn latest_encoded(&self) -> Arc<Encoded> {
        Arc::clone(&self.published.borrow().encoded)
    }

    /// The configuration for Envoy at the current version: the table is
    /// written with the staged changes now if it was not yet (one writer at
    /// a time; the others get its result). If that fails (it cannot with
    /// valid stored tokens), the last one written, and the next catch-up
    /// reloads the table.
    pub async fn encoded(&self) -> Arc<Encoded> {
        loop {
            if let Some(encoded) = fresh(&self.state()) {
                return encoded;
            }
            match self.flush().await {
                Ok(Some(encoded)) => return encoded,
                // The table was reloaded meanwhile: once more.
                Ok(None) => {}
                Err(e) => {
                    tracing::error!("could not write the table for Envoy (the next catch-up reloads it): {e}");
                    self.reload.store(true, Ordering::SeqCst);
                    return self.latest_encoded();
                }
            }
        }
    }

    /// Writes the staged changes into the table, stamped with the published
    /// version, and publishes it as [`Encoded`]. The copy runs without the
    /// table's lock: writes go on staging meanwhile (they stay staged).
    /// `None`: the table was reloaded meanwhile, the copy is of no use.
    async fn flush(&self) -> Result<Option<Arc<Encoded>>, PublishError> {
        let _one = self.flushing.lock().await;
        let started = Instant::now();
        let (flush, buffer, generation, state) = {
            let mut tables = self.tables.lock().await;
            let state = self.state();
            if let Some(encoded) = fresh(&state) {
                return Ok(Some(encoded));
            }
            let version = state.snapshot.version;
            let table = tables
                .table
                .as_ref()
                .ok_or_else(|| PublishError::Task("no table".to_owned()))?;
            let flush = table.prepare(&stamped(&self.header, version), version.stamp());
            (flush, spare(&mut tables), tables.generation, state)
        };
        let written = tokio::task::spawn_blocking(move || flush.run(buffer))
            .await
            .map_err(|e| PublishError::Task(e.to_string()))??;
        let copied = started.elapsed();
        let mut tables = self.tables.lock().await;
        if tables.generation != generation {
            return Ok(None);
        }
        let table = tables
            .table
            .as_mut()
            .ok_or_else(|| PublishError::Task("no table".to_owned()))?;
        table.commit(written)?;
        let api = api_config(&self.api_settings, table)?;
        let version = state.snapshot.version;
        let encoded = Arc::new(Encoded {
            version,
            payload: Arc::clone(table.table().buffer()),
            tokens: state.snapshot.tokens,
        });
        // The current snapshot (perhaps a later version than the one
        // written) over the new table and what stays staged.
        let current = self.current();
        let snapshot = Arc::new(Snapshot {
            version: current.version,
            api: Arc::clone(&api),
            staged: table.staged().clone(),
            tokens: current.tokens,
            published_at: current.published_at,
        });
        tables.api = api;
        retire(&mut tables, &state.encoded);
        self.amend(|p| {
            p.snapshot = snapshot;
            p.encoded = Arc::clone(&encoded);
        });
        drop(tables);
        tracing::info!(
            revision = version.revision.0,
            tokens = encoded.tokens,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "configuration version {version} written for Envoy ({} tokens, {:.1} ms, {:.1} ms of it without the table's lock)",
            encoded.tokens,
            started.elapsed().as_secs_f64() * 1000.0,
            copied.as_secs_f64() * 1000.0
        );
        Ok(Some(encoded))
    }

    pub fn state(&self) -> Arc<Published> {
        Arc::clone(&self.published.borrow())
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.published.subscribe()
    }

    /// Publishes every change up to `revision` (committed by the caller)
    /// and returns the snapshot that carries it. Writers coalesce: one of
    /// them at a time catches up with the store, covering every commit so
    /// far; the others find their change already published. The catch-up
    /// runs on a task of its own: a caller's deadline ends the caller's
    /// wait, never an edit of the table halfway.
    pub async fn publish(
        self: &Arc<Self>,
        revision: Revision,
        deadline: Instant,
    ) -> Result<Arc<Snapshot>, PublishError> {
        loop {
            if let Some(snapshot) = self.covering(revision) {
                return Ok(snapshot);
            }
            let this = Arc::clone(self);
            let job = tokio::spawn(async move {
                let mut live = this.live.lock().await;
                if this.covering(revision).is_some() {
                    return Ok(());
                }
                this.catch_up_or_report(&mut live).await
            });
            match tokio::time::timeout_at(deadline.into(), job).await {
                Err(_) => return Err(PublishError::TimedOut),
                Ok(Err(e)) => return Err(PublishError::Task(e.to_string())),
                Ok(Ok(result)) => result?,
            }
            if self.state().revision < revision {
                // Our commit is not visible to the reader yet (it cannot
                // happen with one store; a replica's read may lag).
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    fn covering(&self, revision: Revision) -> Option<Arc<Snapshot>> {
        let state = self.published.borrow();
        (state.revision >= revision).then(|| Arc::clone(&state.snapshot))
    }

    /// Applies what changed in the store since the last refresh and
    /// publishes the result. Serialised: one refresh at a time, each
    /// covering every write committed before it started.
    pub async fn refresh(&self) -> Result<(), PublishError> {
        let mut live = self.live.lock().await;
        self.catch_up_or_report(&mut live).await
    }

    /// Changes the published state but not its snapshot.
    fn amend(&self, change: impl FnOnce(&mut Published)) {
        self.published.send_modify(|p| {
            let mut next = Published::clone(p);
            change(&mut next);
            *p = Arc::new(next);
        });
    }

    /// [`Publisher::catch_up`], its failure shown to the status page.
    async fn catch_up_or_report(&self, live: &mut Live) -> Result<(), PublishError> {
        let result = self.catch_up(live).await;
        if let Err(e) = &result {
            let error = e.to_string();
            let behind = match e {
                PublishError::Store(StoreError::Behind { seen, .. }) => Some(*seen),
                _ => None,
            };
            self.amend(|p| {
                p.behind = behind.or(p.behind);
                p.error = Some(error);
            });
        }
        result
    }

    /// An Envoy reports it enforces `seen`, newer than what this control
    /// plane publishes (it is holding that Envoy's stream). After a fresh
    /// read of the store (this replica may only be lagging behind another
    /// one): if the store is still before `seen`, it went back in time, and
    /// is marked so (writes stop until an operator starts a new epoch).
    pub async fn reported(&self, seen: Version) {
        if self.refresh().await.is_err() {
            // No fresh read: nothing can be concluded (the stream stays held).
            return;
        }
        let state = self.state();
        if seen <= Position::new(state.epoch, state.revision) {
            return;
        }
        match self.store.mark_behind(seen).await {
            Ok(head) => {
                tracing::error!(
                    "an Envoy enforces version {} of epoch {}, which the store has never reached: {}",
                    seen.revision,
                    seen.epoch,
                    StoreError::Behind {
                        at: head.at,
                        seen: head.behind.unwrap_or(seen)
                    }
                );
                let _ = self.refresh().await;
            }
            Err(e) => tracing::warn!("could not record that the store is behind an Envoy: {e}"),
        }
    }

    /// The store is before what this process published: it went back in
    /// time. Nothing older is published; the store is marked so.
    async fn fell_behind(&self, published: Position, head: Head) -> PublishError {
        let seen = match self.store.mark_behind(published).await {
            Ok(after) => after.behind.unwrap_or(published),
            Err(e) => return PublishError::Store(e),
        };
        PublishError::Store(StoreError::Behind { at: head.at, seen })
    }

    async fn catch_up(&self, live: &mut Live) -> Result<(), PublishError> {
        let started = Instant::now();
        let here = Position::new(live.epoch, live.revision);
        let changes = self.store.changes_since(live.revision).await?;
        let head = match &changes {
            Changes::Since { head, .. } => *head,
            Changes::TooOld => self.store.head().await?,
        };
        if head.at < here {
            return Err(self.fell_behind(here, head).await);
        }
        let reload = self.reload.load(Ordering::SeqCst);
        if head.at == here && !reload {
            if head.behind != self.state().behind {
                self.amend(|p| p.behind = head.behind);
            }
            return Ok(());
        }
        // Read before the table changes: from the edit on, nothing fails
        // but the building of the snapshot (and then `reload` says so).
        let next_expiry = self.store.next_expiry().await?;
        let mut applied = None;
        if let Changes::Since { head, changed } = changes {
            // Within the epoch: the changes only. A new epoch (an operator
            // accepted the store as it is): everything.
            if head.at.epoch == live.epoch && !reload {
                let mut tables = self.tables.lock().await;
                match self.edit(&mut tables, head.at, changed).await {
                    Ok((staged, chunks)) => applied = Some((tables, head, staged, chunks)),
                    Err(e) => tracing::warn!("could not apply the store's changes, reloading everything: {e}"),
                }
            }
        }
        let (mut tables, head, content_changed, step, reloaded) = match applied {
            Some((tables, head, staged, chunks)) => {
                let step = Element {
                    from: here,
                    to: head.at,
                    chunks,
                    revokes: staged.revokes,
                };
                (tables, head, staged.changed, Some(step), false)
            }
            None => {
                // The store is read and the table built without the
                // table's lock (it stays in force meanwhile).
                self.reload.store(true, Ordering::SeqCst);
                let (head, records) = self.store.load().await?;
                if head.at < here {
                    return Err(self.fell_behind(here, head).await);
                }
                let table = build(stamped(&self.header, head.at), records).await?;
                let api = api_config(&self.api_settings, &table)?;
                let mut tables = self.tables.lock().await;
                tables.table = Some(table);
                tables.generation += 1;
                tables.api = api;
                (tables, head, true, None, true)
            }
        };
        if head.at.epoch != live.epoch {
            tracing::warn!(
                "the store started epoch {} (it was {}): an operator accepted it as it is",
                head.at.epoch,
                live.epoch
            );
        }
        live.epoch = head.at.epoch;
        live.revision = head.at.revision;
        live.next_expiry = next_expiry;
        let table = tables
            .table
            .as_ref()
            .ok_or_else(|| PublishError::Task("no table".to_owned()))?;
        let previous = self.state();
        let (snapshot, encoded) = if content_changed {
            let snapshot = Arc::new(Snapshot::new(
                head.at,
                Arc::clone(&tables.api),
                table.staged().clone(),
                table.len(),
            ));
            let how = if reloaded { "reloaded" } else { "staged" };
            tracing::info!(
                revision = snapshot.version.revision.0,
                tokens = snapshot.tokens,
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                "configuration version {} {how} ({} tokens, {:.1} ms)",
                snapshot.version,
                snapshot.tokens,
                started.elapsed().as_secs_f64() * 1000.0
            );
            let encoded = if reloaded {
                encoded_table(head.at, table)
            } else {
                Arc::clone(&previous.encoded)
            };
            (snapshot, encoded)
        } else {
            (Arc::clone(&previous.snapshot), Arc::clone(&previous.encoded))
        };
        let staged = table.staged().len();
        if reloaded {
            retire(&mut tables, &previous.encoded);
        }
        {
            let mut history = self.history();
            match step {
                Some(step) => {
                    if !history.push(step, snapshot.version) {
                        tracing::warn!(
                            revision = head.at.revision.0,
                            "the delta history starts over at revision {} (the step did not follow the last one)",
                            head.at.revision
                        );
                    }
                }
                None => history.reset(head.at, snapshot.version),
            }
        }
        // Published under the table's lock: a write of the table between
        // the edit and here would stamp it with the version before.
        self.reload.store(false, Ordering::SeqCst);
        self.published.send_replace(Arc::new(Published {
            revision: head.at.revision,
            epoch: head.at.epoch,
            behind: head.behind,
            snapshot,
            encoded,
            error: None,
        }));
        drop(tables);
        if staged >= STAGED_MAX {
            self.flush_wanted.notify_one();
        }
        Ok(())
    }

    /// Stages the changes off the async threads (a large batch, an import,
    /// takes a while): what they did, and the changes as the delta channel's
    /// records.
    async fn edit(
        &self,
        tables: &mut Tables,
        at: Position,
        changed: Vec<(String, Option<TokenRecord>)>,
    ) -> Result<(Staged, Vec<Bytes>), PublishError> {
        let mut table = tables
            .table
            .take()
            .ok_or_else(|| PublishError::Task("no table".to_owned()))?;
        self.reload.store(true, Ordering::SeqCst);
        let job = tokio::task::spawn_blocking(move || {
            let changes: Vec<Change<'_>> = changed
                .iter()
                .map(|(name, record)| history::change(name, record.as_ref()))
                .collect();
            let result = table.stage(at.stamp(), &changes);
            let chunks = history::encode(changes.iter().copied());
            (table, result, chunks)
        });
        let (table, result, chunks) = job.await.map_err(|e| PublishError::Task(e.to_string()))?;
        tables.table = Some(table);
        Ok((result?, chunks))
    }

    /// Retires the tokens whose retention has passed (a store write, which
    /// the next refresh applies).
    async fn retire_due(&self) {
        if self.state().behind.is_some() {
            // No write goes through until an operator starts a new epoch.
            return;
        }
        let due = self.live.lock().await.next_expiry.map(|t| add(t, self.retention));
        let now = self.clock.now();
        if due.is_some_and(|t| t <= now) {
            let cutoff = sub(now, self.retention);
            match self.store.retire_expired(cutoff).await {
                Ok(Some(revision)) => {
                    tracing::info!(revision = revision.0, "retired expired tokens at revision {revision}")
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "could not retire expired tokens: {e}"),
            }
        }
    }

    /// Catches up with the store every `poll` (changes by other processes and
    /// replicas) and when the next expired token is due for retirement, until
    /// `shutdown` changes. This process's own writes publish themselves
    /// ([`Publisher::publish`]).
    /// A store that notifies of other processes' writes (PostgreSQL) wakes
    /// it at once; the poll stays, for notifications lost in a reconnection.
    pub async fn run(self: Arc<Self>, poll: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut feed = self.store.change_feed();
        // During an outage every poll fails the same way: the log says so
        // when it starts, when the error changes, and when it ends.
        let mut failing: Option<String> = None;
        // The background writes of the table: every interval, and when too
        // many changes are staged.
        let mut writes = (!self.snapshot_interval.is_zero()).then(|| {
            let mut every = tokio::time::interval_at(
                tokio::time::Instant::now() + self.snapshot_interval,
                self.snapshot_interval,
            );
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every
        });
        loop {
            let due = self.live.lock().await.next_expiry.map(|t| add(t, self.retention));
            let wait = due.map_or(poll, |t| clock::until(t, self.clock.now()).min(poll));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = crate::store::notified(&mut feed) => {}
                () = self.flush_wanted.notified() => {
                    self.encoded().await;
                    continue;
                }
                () = async {
                    match writes.as_mut() {
                        Some(every) => {
                            every.tick().await;
                        }
                        None => std::future::pending().await,
                    }
                } => {
                    self.encoded().await;
                    continue;
                }
                _ = shutdown.changed() => return,
            }
            self.retire_due().await;
            match self.refresh().await {
                Ok(()) => {
                    if failing.take().is_some() {
                        tracing::info!("the store's changes are published again");
                    }
                }
                Err(e) => {
                    let error = e.to_string();
                    if failing.as_deref() != Some(error.as_str()) {
                        tracing::error!(
                            "could not publish the store's changes (retrying on every write and poll, logged again when this changes): {error}"
                        );
                        failing = Some(error);
                    }
                }
            }
        }
    }
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    Timestamp::from_unix(
        t.unix_seconds().saturating_add(secs),
        t.subsec_nanos().saturating_add(d.subsec_nanos()),
    )
}

fn sub(t: Timestamp, d: Duration) -> Timestamp {
    let total = i128::from(t.unix_seconds()) * 1_000_000_000 + i128::from(t.subsec_nanos()) - d.as_nanos() as i128;
    let secs = total.div_euclid(1_000_000_000);
    let nanos = total.rem_euclid(1_000_000_000);
    Timestamp::from_unix(
        i64::try_from(secs).unwrap_or(i64::MIN),
        u32::try_from(nanos).unwrap_or(0),
    )
}

/// Buffers for the next edits, their memory touched once now: a fresh
/// buffer the size of a million-token table costs more in page faults (tens
/// of milliseconds) than the edit that fills it.
async fn spares(len: usize) -> Vec<Arc<Vec<u8>>> {
    let size = len + len / 8 + 4096;
    tokio::task::spawn_blocking(move || {
        (0..SPARES)
            .map(|_| {
                let mut buf = vec![1u8; size];
                buf.clear();
                Arc::new(buf)
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The header of version `at`: every version's bytes differ (see
/// `compact`), even when its tokens are those of an earlier one, and the
/// filter orders them by it.
fn stamped(header: &[u8], at: Version) -> Vec<u8> {
    let mut header = header.to_vec();
    compact::set_stamp(&mut header, at.stamp());
    header
}

/// A whole table from the store's records, off the async threads.
async fn build(header: Vec<u8>, records: Vec<TokenRecord>) -> Result<LiveTable, PublishError> {
    tokio::task::spawn_blocking(move || {
        let entries: Vec<_> = records
            .iter()
            .filter(|r| !r.retired)
            .flat_map(|r| {
                let token = r.entries();
                std::iter::once(token.current).chain(token.previous)
            })
            .collect();
        LiveTable::build(&header, &entries)
    })
    .await
    .map_err(|e| PublishError::Task(e.to_string()))?
    .map_err(PublishError::Table)
}

/// The encoded table, if it is the current version's.
fn fresh(p: &Published) -> Option<Arc<Encoded>> {
    (p.encoded.version == p.snapshot.version).then(|| Arc::clone(&p.encoded))
}

/// What the API checks its callers with: the table as written, the
/// built-in rules (the staged changes go with each [`Snapshot`]).
fn api_config(settings: &PluginConfig, table: &LiveTable) -> Result<Arc<Config>, PublishError> {
    Ok(Arc::new(Config::with_table(settings, table.table().clone())?))
}

/// The table as written (no staged changes), for Envoy.
fn encoded_table(version: Version, table: &LiveTable) -> Arc<Encoded> {
    Arc::new(Encoded {
        version,
        payload: Arc::clone(table.table().buffer()),
        tokens: table.len(),
    })
}

/// A buffer for the next table: a spare one nobody holds any more, if any.
fn spare(tables: &mut Tables) -> Vec<u8> {
    tables
        .spare
        .iter()
        .position(|b| Arc::strong_count(b) == 1)
        .map(|i| tables.spare.swap_remove(i))
        .and_then(|b| Arc::try_unwrap(b).ok())
        .unwrap_or_default()
}

/// `replaced` is no longer the latest table: its buffer is reused once no
/// stream or request holds it.
fn retire(tables: &mut Tables, replaced: &Encoded) {
    tables.spare.push(Arc::clone(&replaced.payload));
    if tables.spare.len() > SPARES {
        tables.spare.remove(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{new_digest, record, test_event};
    use crate::store::SqliteStore;
    use crate::testutil::TempDir;
    use apitokens_core::table::{Digest, Overlay, TokenTable};
    use apitokens_core::Role;

    /// A token with this expiry (the store contract's record otherwise).
    fn rec(name: &str, byte: u8, expire: Option<Timestamp>) -> TokenRecord {
        TokenRecord {
            expire_time: expire,
            ..record(name, Role::Owner, byte)
        }
    }

    async fn publisher(dir: &TempDir) -> (Arc<Publisher>, Arc<dyn Store>) {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("p.db")).unwrap());
        let p = Publisher::open(Arc::clone(&store), PublisherOptions::default())
            .await
            .unwrap();
        (p, store)
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn a_write_stages_and_the_table_is_written_when_needed_or_too_much_is_staged() {
        let dir = TempDir::new("pub-staged");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("p.db")).unwrap());
        let opts = PublisherOptions {
            snapshot_interval: Duration::from_secs(3600),
            ..PublisherOptions::default()
        };
        let p = Publisher::open(Arc::clone(&store), opts).await.unwrap();
        let r = store
            .insert(vec![rec("namespaces/a/apitokens/t", 1, None)], None, vec![])
            .await
            .unwrap();
        let s = p.publish(r, deadline()).await.unwrap();
        // Published for the API at once; the table for Envoy not written.
        assert_eq!(s.tokens, 1);
        assert!(s.token(&Digest([1; 32])).is_some());
        assert!(p.latest_encoded().version < s.version);
        // Written when asked for: the current version, as built from scratch.
        let e = p.encoded().await;
        assert_eq!(e.version, s.version);
        let filter = Config::from_plugin_configuration(e.payload.to_vec()).unwrap();
        assert_eq!(
            filter.tokens().get(&Digest([1; 32])).unwrap().name(),
            "namespaces/a/apitokens/t"
        );
        assert!(
            p.current().token(&Digest([1; 32])).is_some(),
            "found in the written table"
        );
        // Too many staged: the background writes the table.
        let (_stop, stopped) = watch::channel(false);
        tokio::spawn(Arc::clone(&p).run(Duration::from_secs(3600), stopped));
        let records: Vec<_> = (0..=STAGED_MAX)
            .map(|i| {
                let mut r = rec(&format!("namespaces/b/apitokens/t{i}"), 0, None);
                r.digest = Digest::of(&i.to_le_bytes());
                r
            })
            .collect();
        let r = store.insert(records, None, vec![]).await.unwrap();
        let s = p.publish(r, deadline()).await.unwrap();
        assert_eq!(s.tokens, STAGED_MAX + 2);
        let started = Instant::now();
        while p.latest_encoded().version < s.version {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "not written in the background"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(p.latest_encoded().tokens, STAGED_MAX + 2);
    }

    #[tokio::test]
    async fn versions_follow_content_changes() {
        let dir = TempDir::new("pub-versions");
        let (p, store) = publisher(&dir).await;
        let v0 = p.current().version;
        p.refresh().await.unwrap();
        assert_eq!(p.current().version, v0, "nothing changed");
        let r1 = store
            .insert(vec![rec("namespaces/a/apitokens/t", 1, None)], None, vec![])
            .await
            .unwrap();
        p.refresh().await.unwrap();
        let s1 = p.publish(r1, deadline()).await.unwrap();
        assert_eq!(s1.version.revision, r1);
        assert_eq!(s1.tokens, 1);
        assert!(s1.token(&Digest([1; 32])).is_some(), "the API sees it");
        // A write that changes nothing pushed (a retired token's secret)
        // advances the revision, not the version.
        let mut old = rec("namespaces/a/apitokens/old", 2, Some(Timestamp::from_unix(1, 0)));
        old.retired = true;
        let r2 = store.insert(vec![old], None, vec![]).await.unwrap();
        p.refresh().await.unwrap();
        assert_eq!(p.publish(r2, deadline()).await.unwrap().version, s1.version);
        assert_eq!(p.state().revision, r2);
    }

    #[tokio::test]
    async fn the_pushed_payload_is_what_the_filter_reads() {
        let dir = TempDir::new("pub-payload");
        let (p, store) = publisher(&dir).await;
        store
            .insert(
                vec![
                    rec("namespaces/a/apitokens/t", 1, None),
                    rec(
                        "namespaces/b/apitokens/u",
                        2,
                        Some(Timestamp::from_unix(4_000_000_000, 5)),
                    ),
                ],
                None,
                vec![],
            )
            .await
            .unwrap();
        p.refresh().await.unwrap();
        let r = store
            .delete("namespaces/a/apitokens/t", test_event())
            .await
            .unwrap()
            .unwrap();
        p.refresh().await.unwrap();
        p.publish(r, deadline()).await.unwrap();
        let s = p.encoded().await;
        let filter = Config::from_plugin_configuration(s.payload.to_vec()).unwrap();
        let names: Vec<_> = filter.tokens().iter().map(|(_, t)| t.name().to_owned()).collect();
        assert_eq!(names, ["namespaces/b/apitokens/u"]);
        assert_eq!(compact::lineage(&s.payload), Some(&store.lineage()[..]));
    }

    #[tokio::test]
    async fn writes_by_another_process_are_picked_up() {
        let dir = TempDir::new("pub-other");
        let (p, _store) = publisher(&dir).await;
        let other = SqliteStore::open(&dir.path().join("p.db")).unwrap();
        let r = other
            .insert(vec![rec("namespaces/a/apitokens/t", 1, None)], None, vec![])
            .await
            .unwrap();
        p.refresh().await.unwrap();
        assert_eq!(p.publish(r, deadline()).await.unwrap().tokens, 1);
    }

    #[tokio::test]
    async fn expired_tokens_are_retired_after_the_retention() {
        let dir = TempDir::new("pub-expiry");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("p.db")).unwrap());
        let at = Timestamp::from_unix(clock::now().unix_seconds() + 1, 0);
        store
            .insert(
                vec![
                    rec("namespaces/a/apitokens/brief", 2, Some(at)),
                    rec("namespaces/a/apitokens/stays", 3, None),
                ],
                None,
                vec![],
            )
            .await
            .unwrap();
        let p = Publisher::open(
            Arc::clone(&store),
            PublisherOptions {
                expired_retention: Duration::from_millis(300),
                ..PublisherOptions::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(p.current().tokens, 2);
        let (stop_tx, stop_rx) = watch::channel(false);
        // A long poll interval: only the expiry timer can wake it in time.
        let task = tokio::spawn(Arc::clone(&p).run(Duration::from_secs(60), stop_rx));
        let mut rx = p.subscribe();
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.snapshot.tokens == 1))
            .await
            .unwrap()
            .unwrap();
        assert!(
            clock::now() >= add(at, Duration::from_millis(300)),
            "not before the retention"
        );
        assert!(started.elapsed() < Duration::from_secs(4));
        assert!(
            store
                .get("namespaces/a/apitokens/brief")
                .await
                .unwrap()
                .unwrap()
                .retired
        );
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_burst_of_writes_is_one_edit() {
        let dir = TempDir::new("pub-burst");
        let (p, store) = publisher(&dir).await;
        let mut last = Revision(0);
        for i in 0..50u8 {
            last = store
                .insert(
                    vec![rec(&format!("namespaces/a/apitokens/t{i}"), i, None)],
                    None,
                    vec![],
                )
                .await
                .unwrap();
        }
        let before = p.current().version;
        p.refresh().await.unwrap();
        let s = p.publish(last, deadline()).await.unwrap();
        assert_eq!(s.tokens, 50);
        assert_eq!(s.version.revision, last);
        assert!(s.version > before);
    }

    #[tokio::test]
    async fn a_store_that_goes_back_in_time_is_never_published() {
        let dir = TempDir::new("pub-back");
        let (p, store) = publisher(&dir).await;
        for (i, name) in ["a", "b"].iter().enumerate() {
            store
                .insert(
                    vec![rec(&format!("namespaces/x/apitokens/{name}"), i as u8 + 1, None)],
                    None,
                    vec![],
                )
                .await
                .unwrap();
        }
        let r = store
            .delete("namespaces/x/apitokens/a", test_event())
            .await
            .unwrap()
            .unwrap();
        let published = p.publish(r, deadline()).await.unwrap();
        assert_eq!(published.tokens, 1);
        // The database goes back two revisions (a restored backup, a lossy
        // failover).
        rusqlite::Connection::open(dir.path().join("p.db"))
            .unwrap()
            .execute("UPDATE meta SET value = value - 2 WHERE key = 'revision'", [])
            .unwrap();
        let err = p.refresh().await.unwrap_err();
        assert!(err.to_string().contains("behind"), "{err}");
        // Nothing older went out; the store refuses writes from now on.
        assert!(Arc::ptr_eq(&p.current(), &published));
        let state = p.state();
        assert_eq!(state.behind, Some(published.version));
        assert!(matches!(
            store
                .insert(vec![rec("namespaces/x/apitokens/c", 3, None)], None, vec![])
                .await,
            Err(StoreError::Behind { .. })
        ));
        // The operator accepts the store: a later epoch, published at once.
        store.new_epoch().await.unwrap();
        p.refresh().await.unwrap();
        let now = p.current();
        assert!(now.version > published.version);
        assert!(now.version.epoch > published.version.epoch);
        assert_eq!(p.state().behind, None);
        let (epoch, generation) = (now.version.epoch.0, now.version.revision.0);
        assert_eq!(
            compact::stamp(&p.encoded().await.payload),
            Some(compact::Stamp { epoch, generation })
        );
    }

    /// What a VM enforces: `table` with `overlay` over it.
    type Seen = Option<(String, Role, bool, Option<Timestamp>)>;

    fn lookups(table: &TokenTable, overlay: &Overlay, digests: &[Digest]) -> Vec<Seen> {
        digests
            .iter()
            .map(|d| {
                overlay
                    .get(table, d)
                    .map(|t| (t.name().to_owned(), t.role(), t.is_previous(), t.expire()))
            })
            .collect()
    }

    /// Applies steps as a VM does: every chunk decoded, at the step's end.
    fn apply(overlay: &mut Overlay, steps: &[Arc<Element>]) {
        let mut at = None;
        for step in steps {
            assert!(at.is_none_or(|at| step.from <= at), "steps chain");
            for chunk in &step.chunks {
                assert!(chunk.len() <= history::MAX_CHUNK_BYTES);
                let changes = apitokens_core::delta::decode_changes(chunk).unwrap();
                overlay.apply(step.to.stamp(), &changes);
            }
            at = Some(step.to);
        }
    }

    fn here(p: &Publisher) -> Position {
        let state = p.state();
        Position::new(state.epoch, state.revision)
    }

    /// The table a VM gets by ECDS now.
    async fn table(p: &Publisher) -> TokenTable {
        let encoded = p.encoded().await;
        Config::from_plugin_configuration(encoded.payload.to_vec())
            .unwrap()
            .tokens()
            .clone()
    }

    async fn published(p: &Arc<Publisher>, r: Revision, seen: &mut Vec<(Position, TokenTable)>) {
        p.publish(r, deadline()).await.unwrap();
        seen.push((here(p), table(p).await));
    }

    fn steps(reach: Reach) -> Vec<Arc<Element>> {
        match reach {
            Reach::Elements(steps) => steps,
            Reach::Live => Vec::new(),
            other => panic!("{other:?}"),
        }
    }

    fn digest(n: u32) -> Digest {
        Digest::of(&n.to_le_bytes())
    }

    fn token(name: &str, n: u32) -> TokenRecord {
        TokenRecord {
            digest: digest(n),
            ..rec(name, 0, None)
        }
    }

    #[tokio::test]
    async fn a_vm_anywhere_in_the_history_ends_up_with_the_published_table() {
        let dir = TempDir::new("pub-history");
        let (p, store) = publisher(&dir).await;
        let name = |i: u32| format!("namespaces/a/apitokens/t{i}");
        let r = store
            .insert((0..5).map(|i| token(&name(i), i)).collect(), None, vec![])
            .await
            .unwrap();
        p.publish(r, deadline()).await.unwrap();
        // Where VMs stand: every position published, and the tables they had.
        let mut seen = vec![(here(&p), table(&p).await)];
        // Each write published before the next: one step each.
        let r = store.insert(vec![token(&name(5), 5)], None, vec![]).await.unwrap();
        published(&p, r, &mut seen).await;
        // A regeneration with an overlap: the old secret stays, as previous.
        let until = Some(Timestamp::from_unix(4_000_000_000, 0));
        let (_, r) = store
            .replace_digest(new_digest(&name(1), digest(11), until), test_event())
            .await
            .unwrap()
            .unwrap();
        published(&p, r, &mut seen).await;
        let r = store.delete(&name(2), test_event()).await.unwrap().unwrap();
        published(&p, r, &mut seen).await;
        // A write the filter does not see (a retired token): an empty step.
        let retired = TokenRecord {
            retired: true,
            ..token("namespaces/a/apitokens/gone", 99)
        };
        let r = store.insert(vec![retired], None, vec![]).await.unwrap();
        published(&p, r, &mut seen).await;
        // A regeneration without overlap, then a create.
        let (_, r) = store
            .replace_digest(new_digest(&name(3), digest(13), None), test_event())
            .await
            .unwrap()
            .unwrap();
        published(&p, r, &mut seen).await;
        let r = store.insert(vec![token(&name(6), 6)], None, vec![]).await.unwrap();
        published(&p, r, &mut seen).await;
        // One step per catch-up, chained, the empty one included.
        let all = steps(p.delta_since(seen[0].0));
        assert_eq!(all.len(), 6);
        assert!(all.windows(2).all(|w| w[0].to == w[1].from));
        let probe: Vec<Digest> = (0..20).map(digest).collect();
        let now = table(&p).await;
        let want = lookups(&now, &Overlay::default(), &probe);
        assert!(
            want[1].as_ref().is_some_and(|t| t.0 == name(1) && t.2),
            "t1's previous secret"
        );
        assert!(want[2].is_none() && want[3].is_none() && want[13].is_some());
        for (i, (at, table)) in seen.iter().enumerate() {
            let later = steps(p.delta_since(*at));
            assert_eq!(later.len(), 6 - i, "a VM at step {i} gets exactly the later steps");
            let mut overlay = Overlay::default();
            apply(&mut overlay, &later);
            assert_eq!(lookups(table, &overlay, &probe), want, "from step {i}");
        }
        // A VM at the snapshot's version with a later position: nothing lags.
        assert_eq!(p.delta_since(here(&p)), Reach::Live);
    }

    #[tokio::test]
    async fn a_large_step_is_chunked_at_record_boundaries() {
        let dir = TempDir::new("pub-chunks");
        let (p, store) = publisher(&dir).await;
        let before = (here(&p), table(&p).await);
        // Long names: about 150 bytes a record, 9,000 of them in one write.
        let records: Vec<TokenRecord> = (0..9_000)
            .map(|i| {
                let name = format!("namespaces/{:0>63}/apitokens/{:0>63}", i % 7, i);
                token(&name, i)
            })
            .collect();
        let r = store.insert(records, None, vec![]).await.unwrap();
        p.publish(r, deadline()).await.unwrap();
        let steps = steps(p.delta_since(before.0));
        assert_eq!(steps.len(), 1);
        assert!(steps[0].chunks.len() >= 2, "{} chunks", steps[0].chunks.len());
        let probe: Vec<Digest> = (0..9_000).step_by(97).map(digest).collect();
        let mut overlay = Overlay::default();
        apply(&mut overlay, &steps);
        let want = lookups(&table(&p).await, &Overlay::default(), &probe);
        assert!(want.iter().all(Option::is_some));
        assert_eq!(lookups(&before.1, &overlay, &probe), want);
    }

    #[tokio::test]
    async fn a_vm_before_the_history_catches_up_from_the_store_or_needs_a_snapshot() {
        let dir = TempDir::new("pub-catch-up");
        let (p, store) = publisher(&dir).await;
        let r = store
            .insert(vec![token("namespaces/a/apitokens/t0", 0)], None, vec![])
            .await
            .unwrap();
        p.publish(r, deadline()).await.unwrap();
        let (old, old_table) = (here(&p), table(&p).await);
        for i in 1..4 {
            store
                .insert(vec![token(&format!("namespaces/a/apitokens/t{i}"), i)], None, vec![])
                .await
                .unwrap();
        }
        store.delete("namespaces/a/apitokens/t0", test_event()).await.unwrap();
        // A restarted control plane: its history starts at the head.
        let (p, _) = publisher(&dir).await;
        assert_eq!(p.delta_since(old), Reach::Before);
        let CatchUp::Step(step) = p.catch_up_from(old).await.unwrap() else {
            panic!("no step")
        };
        assert_eq!((step.from, step.to), (old, here(&p)));
        let probe: Vec<Digest> = (0..5).map(digest).collect();
        let mut overlay = Overlay::default();
        apply(&mut overlay, std::slice::from_ref(&step));
        assert_eq!(
            lookups(&old_table, &overlay, &probe),
            lookups(&table(&p).await, &Overlay::default(), &probe)
        );
        // The next VM at that position shares the read.
        let CatchUp::Step(again) = p.catch_up_from(old).await.unwrap() else {
            panic!("no step")
        };
        assert!(Arc::ptr_eq(&step, &again));
        // A position the change log no longer reaches: a snapshot.
        rusqlite::Connection::open(dir.path().join("p.db"))
            .unwrap()
            .execute(
                "UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'revision') WHERE key = 'changes_from'",
                [],
            )
            .unwrap();
        let older = Position::new(old.epoch, Revision(old.revision.0 - 1));
        assert!(matches!(p.catch_up_from(older).await.unwrap(), CatchUp::SnapshotNeeded));
        // A new epoch: every VM of the old one needs a snapshot.
        store.new_epoch().await.unwrap();
        p.refresh().await.unwrap();
        assert_eq!(p.delta_since(old), Reach::Gone);
        assert_eq!(p.delta_since(here(&p)), Reach::Live);
    }

    #[tokio::test]
    async fn an_envoy_ahead_of_the_store_stops_writes_but_one_ahead_of_this_replica_does_not() {
        let dir = TempDir::new("pub-reported");
        let (p, store) = publisher(&dir).await;
        let r = store
            .insert(vec![rec("namespaces/x/apitokens/a", 1, None)], None, vec![])
            .await
            .unwrap();
        // Another process wrote r; an Envoy reports it before this publisher
        // polled: only this publisher lagged.
        let here = p.current().version;
        let seen = Position::new(here.epoch, r);
        p.reported(seen).await;
        assert_eq!(p.state().behind, None);
        assert_eq!(p.current().version, seen);
        // An Envoy reports a version the store never reached.
        let ahead = Position::new(here.epoch, Revision(r.0 + 3));
        p.reported(ahead).await;
        assert_eq!(p.state().behind, Some(ahead));
        assert_eq!(store.head().await.unwrap().behind, Some(ahead));
    }
}
