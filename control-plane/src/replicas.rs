//! Several `serve` replicas on one PostgreSQL database: what they share
//! beyond the tokens, so that a write answered by any replica waits until the
//! Envoys of every replica applied it, and `/status` shows them all.
//!
//! Each replica, through the [`Coordinator`]:
//! - registers itself in `replicas` (a random id per start, and its
//!   `--replica-name`), and heartbeats there every quarter of
//!   `--replica-timeout-ms`;
//! - records its connected Envoy streams in `envoy_streams` whenever one
//!   connects, ACKs, NACKs or goes (one transaction), and `NOTIFY
//!   apitokens_envoys`; its filter VMs' delta streams too (rows of the same
//!   table, told apart by their status's `vm`, numbered with the Envoy
//!   streams), so that a write on any replica waits for a VM connected to
//!   any other, and an ECDS stream on one replica sends its node a snapshot
//!   at once when a VM of that node, connected to another, awaits one;
//! - reads the other replicas' streams at each such notification and at each
//!   heartbeat, and hands them to its ACK [`Tracker`], where waiting writes
//!   count them like its own.
//!
//! A replica whose heartbeat is older than the timeout (killed, or cut off
//! from the database) is shown as not live, and no write waits for its
//! Envoys any more: they reconnect to another replica, where they count
//! again. A replica that has not reached the database for the timeout
//! knows it is such a replica ([`Coordinator::liveness`]): it stops serving
//! xDS (streams closed, port closed), so that its Envoys move to a live
//! replica instead of waiting on one that cannot see the writes. After a database outage every heartbeat is old: for one timeout
//! after it is back, a replica still counts the others that were alive when
//! it last reached the database (their heartbeats were at most a timeout
//! older than its own last one), so nobody alive is dropped by mistake and
//! nobody dead before the outage comes back. Rows of
//! replicas silent for [`FORGET_AFTER`] are deleted; a clean shutdown deletes
//! its own at once.

use crate::acks::{self, EnvoyStatus, RemoteStream, RemoteVm, ReplicaStatus, Tracker, VmStatus};
use crate::config::Version;
use crate::store::{Epoch, PostgresStore, Revision, StoreError, ENVOYS_CHANNEL};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long the rows of a replica that stopped heartbeating stay (shown on
/// `/status` as not live) before any replica deletes them.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// Shown on `/status` and in write answers (`gateway-1 (replica r2, stream 4)`).
    pub name: String,
    /// A replica whose heartbeat is older than this is not waited for.
    pub timeout: Duration,
}

pub struct Coordinator {
    store: Arc<PostgresStore>,
    acks: Arc<Tracker>,
    id: String,
    name: String,
    timeout: Duration,
    /// The database answered a heartbeat within the timeout.
    live: watch::Sender<bool>,
}

/// A stream as written: acked, nacked (version, error), the status as JSON.
type StreamRow = (Option<Version>, Option<(Version, String)>, String);

/// What was last written, to write only what changed.
#[derive(Default)]
struct Shared {
    published: BTreeMap<u64, String>,
    /// Something must be (re)written even if nothing changed locally.
    dirty: bool,
    /// Since when the database answers (None: it does not).
    ok_since: Option<Instant>,
    /// The database's clock at this replica's last heartbeat (seconds).
    last_beat: Option<f64>,
    /// During an outage and for a timeout after it: `last_beat` when the
    /// outage began (see the module's notes).
    outage_from: Option<f64>,
    /// The last heartbeat the database answered.
    last_ok: Option<Instant>,
}

fn unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    })
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Coordinator {
    /// Registers this replica.
    pub async fn join(store: Arc<PostgresStore>, acks: Arc<Tracker>, opts: ReplicaOptions) -> Result<Self, StoreError> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes)
            .map_err(|e| StoreError::Unavailable(format!("the OS random source failed: {e}")))?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let this = Self {
            store,
            acks,
            id,
            name: opts.name,
            timeout: opts.timeout.max(Duration::from_millis(200)),
            live: watch::channel(true).0,
        };
        this.register().await?;
        this.acks.set_replica(&this.name);
        tracing::info!("replica {} ({}) joined the store's replicas", this.name, this.id);
        Ok(this)
    }

    async fn register(&self) -> Result<(), StoreError> {
        self.store
            .conn()
            .await?
            .execute(
                "INSERT INTO replicas (id, name) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
                &[&self.id, &self.name],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Whether this replica reached the database within the timeout: while
    /// false, it serves no xDS (see the module's notes).
    pub fn liveness(&self) -> watch::Receiver<bool> {
        self.live.subscribe()
    }

    /// Heartbeats, shares this replica's streams and reads the others' until
    /// `shutdown`; then leaves (its Envoys are no longer waited for). Every
    /// database call is bounded by half the timeout: a database behind a
    /// frozen network (sockets open, nothing answers) is noticed in time.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut local = self.acks.subscribe_local();
        let mut remote = self.store.envoy_feed();
        let mut tick = tokio::time::interval(self.timeout / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shared = Shared {
            dirty: true,
            ok_since: Some(Instant::now()),
            last_ok: Some(Instant::now()),
            ..Shared::default()
        };
        let bound = self.timeout / 2;
        loop {
            tokio::select! {
                _ = local.changed() => {
                    let _ = tokio::time::timeout(bound, self.publish(&mut shared)).await;
                }
                () = crate::store::notified(&mut remote) => {
                    let _ = tokio::time::timeout(bound, self.refresh(&shared)).await;
                }
                _ = tick.tick() => {
                    if tokio::time::timeout(bound, self.heartbeat(&mut shared)).await.is_err() {
                        self.heartbeat_failed(&mut shared, &StoreError::Unavailable("no answer in time".to_owned()));
                    }
                    self.check_liveness(&shared);
                    if shared.ok_since.is_none() {
                        // Unreachable: the next heartbeat tries again.
                        continue;
                    }
                    if shared.dirty {
                        let _ = tokio::time::timeout(bound, self.publish(&mut shared)).await;
                    }
                    let _ = tokio::time::timeout(bound, self.refresh(&shared)).await;
                }
                stop = shutdown.changed() => if stop.is_err() || *shutdown.borrow() { break },
            }
        }
        if let Err(e) = self.leave().await {
            tracing::warn!(
                "replica {}: could not leave the replicas table (others drop it after the timeout): {e}",
                self.name
            );
        }
    }

    fn check_liveness(&self, shared: &Shared) {
        let live = shared.last_ok.is_some_and(|t| t.elapsed() < self.timeout);
        if self.live.send_if_modified(|was| std::mem::replace(was, live) != live) {
            if live {
                tracing::info!("replica {}: the database answers: serving xDS again", self.name);
            } else {
                tracing::warn!(
                    "replica {}: no answer from the database for {} ms: xDS stops (its Envoys move to a live replica)",
                    self.name,
                    self.timeout.as_millis()
                );
            }
        }
    }

    fn heartbeat_failed(&self, shared: &mut Shared, e: &StoreError) {
        if shared.outage_from.is_none() {
            shared.outage_from = shared.last_beat;
        }
        if shared.ok_since.take().is_some() {
            tracing::warn!(
                "replica {}: heartbeat failed (the Envoys keep their configuration): {e}",
                self.name
            );
        }
        shared.dirty = true;
    }

    async fn heartbeat(&self, shared: &mut Shared) {
        // Not right after an outage: every heartbeat is old then.
        let forget = shared.outage_from.is_none() && shared.ok_since.is_some();
        let result = async {
            let conn = self.store.conn().await?;
            let beat = conn
                .query_opt(
                    "UPDATE replicas SET heartbeat_at = now() WHERE id = $1
                     RETURNING extract(epoch FROM heartbeat_at)::float8",
                    &[&self.id],
                )
                .await
                .map_err(unavailable)?
                .and_then(|row| row.try_get::<_, f64>(0).ok());
            if forget {
                conn.execute(
                    "DELETE FROM replicas WHERE heartbeat_at < now() - $1 * interval '1 millisecond'",
                    &[&(millis(FORGET_AFTER) as f64)],
                )
                .await
                .map_err(unavailable)?;
            }
            Ok::<Option<f64>, StoreError>(beat)
        }
        .await;
        match result {
            Ok(beat) => {
                shared.last_ok = Some(Instant::now());
                if beat.is_some() {
                    shared.last_beat = beat;
                }
                if shared.ok_since.is_some_and(|t| t.elapsed() >= self.timeout) {
                    shared.outage_from = None;
                }
                if beat.is_none() {
                    // Forgotten by the others (silent for a minute): back in.
                    if let Err(e) = self.register().await {
                        tracing::warn!("replica {}: cannot register again: {e}", self.name);
                        return;
                    }
                    shared.published.clear();
                    shared.dirty = true;
                }
                if shared.ok_since.is_none() {
                    tracing::info!("replica {}: the database answers again", self.name);
                    shared.ok_since = Some(Instant::now());
                    shared.dirty = true;
                }
            }
            Err(e) => self.heartbeat_failed(shared, &e),
        }
    }

    /// Writes the streams that changed since the last write.
    async fn publish(&self, shared: &mut Shared) {
        let current: BTreeMap<u64, StreamRow> = self
            .acks
            .local_streams()
            .into_iter()
            .filter_map(|s| {
                let json = serde_json::to_string(&s.status).ok()?;
                Some((s.status.stream, (s.acked, s.nacked, json)))
            })
            .chain(self.acks.local_vms().into_iter().filter_map(|vm| {
                let json = serde_json::to_string(&vm.status).ok()?;
                Some((vm.status.stream, (vm.acked, None, json)))
            }))
            .collect();
        let changed: Vec<_> = current
            .iter()
            .filter(|(id, (_, _, json))| shared.published.get(id) != Some(json))
            .collect();
        let removed: Vec<i64> = shared
            .published
            .keys()
            .filter(|id| !current.contains_key(id))
            .filter_map(|id| i64::try_from(*id).ok())
            .collect();
        if changed.is_empty() && removed.is_empty() && !shared.dirty {
            return;
        }
        let result = async {
            let mut conn = self.store.conn().await?;
            let tx = conn.transaction().await.map_err(unavailable)?;
            if shared.dirty {
                // After an outage or a re-registration: the whole set.
                tx.execute(
                    "DELETE FROM envoy_streams WHERE replica_id = $1 AND NOT (stream = ANY($2))",
                    &[
                        &self.id,
                        &current
                            .keys()
                            .filter_map(|k| i64::try_from(*k).ok())
                            .collect::<Vec<_>>(),
                    ],
                )
                .await
                .map_err(unavailable)?;
            } else if !removed.is_empty() {
                tx.execute(
                    "DELETE FROM envoy_streams WHERE replica_id = $1 AND stream = ANY($2)",
                    &[&self.id, &removed],
                )
                .await
                .map_err(unavailable)?;
            }
            let all: Vec<_> = if shared.dirty {
                current.iter().collect()
            } else {
                changed
            };
            for (stream, (acked, nacked, json)) in all {
                let number = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                tx.execute(
                    "INSERT INTO envoy_streams (replica_id, stream, acked_version, nacked_version, nack_error, status,
                                                acked_epoch, nacked_epoch)
                     VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8)
                     ON CONFLICT (replica_id, stream) DO UPDATE SET acked_version = $3, nacked_version = $4,
                         nack_error = $5, status = $6::text::jsonb, acked_epoch = $7, nacked_epoch = $8",
                    &[
                        &self.id,
                        &i64::try_from(*stream).unwrap_or(i64::MAX),
                        &acked.map(|v| number(v.revision.0)),
                        &nacked.as_ref().map(|(v, _)| number(v.revision.0)),
                        &nacked.as_ref().map(|(_, e)| e.as_str()),
                        json,
                        &acked.map(|v| number(v.epoch.0)),
                        &nacked.as_ref().map(|(v, _)| number(v.epoch.0)),
                    ],
                )
                .await
                .map_err(unavailable)?;
            }
            tx.execute("SELECT pg_notify($1, $2)", &[&ENVOYS_CHANNEL, &self.id])
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)
        }
        .await;
        match result {
            Ok(()) => {
                shared.published = current.into_iter().map(|(id, (_, _, json))| (id, json)).collect();
                shared.dirty = false;
            }
            Err(e) => {
                tracing::debug!(
                    "replica {}: could not share its Envoy streams (retrying): {e}",
                    self.name
                );
                shared.dirty = true;
            }
        }
    }

    /// Reads every replica and the other replicas' streams into the tracker.
    async fn refresh(&self, shared: &Shared) {
        let result = async {
            let conn = self.store.conn().await?;
            conn.query(
                "SELECT r.id, r.name, (extract(epoch FROM now() - r.heartbeat_at) * 1000)::bigint,
                        s.acked_version, s.nacked_version, s.nack_error, s.status::text,
                        extract(epoch FROM r.heartbeat_at)::float8, s.acked_epoch, s.nacked_epoch
                 FROM replicas r LEFT JOIN envoy_streams s ON s.replica_id = r.id
                 ORDER BY r.name, r.id, s.stream",
                &[],
            )
            .await
            .map_err(unavailable)
        }
        .await;
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!("replica {}: could not read the other replicas: {e}", self.name);
                return;
            }
        };
        // Right after an outage: alive when this replica last reached the
        // database (see the module's notes).
        let spared = |beat: f64| {
            shared
                .outage_from
                .is_some_and(|from| beat >= from - self.timeout.as_secs_f64())
        };
        let mut replicas: Vec<ReplicaStatus> = Vec::new();
        let mut streams = Vec::new();
        let mut remote_vms = Vec::new();
        for row in rows {
            let Ok(id) = row.try_get::<_, String>(0) else { continue };
            let name: String = row.try_get(1).unwrap_or_default();
            let age = u64::try_from(row.try_get::<_, i64>(2).unwrap_or(0)).unwrap_or(0);
            let this = id == self.id;
            let beat: f64 = row.try_get(7).unwrap_or(0.0);
            let live = this || Duration::from_millis(age) < self.timeout || spared(beat);
            if replicas.last().is_none_or(|r| r.id != id) {
                replicas.push(ReplicaStatus {
                    name: name.clone(),
                    id: id.clone(),
                    this,
                    live,
                    heartbeat_age_ms: age,
                    envoys: 0,
                });
            }
            let Ok(Some(json)) = row.try_get::<_, Option<String>>(6) else {
                continue;
            };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&json) else {
                continue;
            };
            let vm = acks::is_vm(&json);
            if !vm {
                if let Some(r) = replicas.last_mut() {
                    r.envoys += 1;
                }
            }
            if this {
                continue;
            }
            let version = |epoch: usize, revision: usize| {
                let number = |at: usize| {
                    row.try_get::<_, Option<i64>>(at)
                        .ok()
                        .flatten()
                        .and_then(|v| u64::try_from(v).ok())
                };
                Some(Version::new(
                    Epoch(number(epoch).unwrap_or(0)),
                    Revision(number(revision)?),
                ))
            };
            if vm {
                let Ok(mut status) = serde_json::from_value::<VmStatus>(json) else {
                    continue;
                };
                status.replica = Some(name);
                remote_vms.push(RemoteVm {
                    live,
                    acked: version(8, 3),
                    status,
                });
                continue;
            }
            let Ok(mut status) = serde_json::from_value::<EnvoyStatus>(json) else {
                continue;
            };
            status.replica = Some(name);
            let nacked = version(9, 4).map(|v| {
                (
                    v,
                    row.try_get::<_, Option<String>>(5).ok().flatten().unwrap_or_default(),
                )
            });
            streams.push(RemoteStream {
                live,
                acked: version(8, 3),
                nacked,
                status,
            });
        }
        self.acks.set_remote(streams, remote_vms, replicas);
    }

    async fn leave(&self) -> Result<(), StoreError> {
        let conn = self.store.conn().await?;
        conn.execute("DELETE FROM replicas WHERE id = $1", &[&self.id])
            .await
            .map_err(unavailable)?;
        conn.execute("SELECT pg_notify($1, $2)", &[&ENVOYS_CHANNEL, &self.id])
            .await
            .map_err(unavailable)?;
        tracing::info!("replica {} left the store's replicas", self.name);
        Ok(())
    }
}
