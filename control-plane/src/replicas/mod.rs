//! Several `serve` replicas on one PostgreSQL database: what they share
//! beyond the tokens, so that a write answered by any replica waits until the
//! Envoys of every replica applied it, and `/status` shows them all.
//!
//! The rules (heartbeats, who counts, an outage of the database, a replica
//! restarted, forgetting the silent) are a state machine in `state`,
//! tested without a database or a clock; the statements are the store's
//! (`PostgresStore::heartbeat` and its neighbours); the [`Coordinator`] runs
//! the one against the other and hands what it reads to the ACK tracker
//! (`streams` converts between the two).

mod state;
mod streams;

pub use state::FORGET_AFTER;

use crate::acks::Tracker;
use crate::store::{Cause, PostgresStore, StoreError};
use state::{Action, Beat, State};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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

impl Coordinator {
    /// Registers this replica.
    pub async fn join(store: Arc<PostgresStore>, acks: Arc<Tracker>, opts: ReplicaOptions) -> Result<Self, StoreError> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(Cause::Random)?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let this = Self {
            store,
            acks,
            id,
            name: opts.name,
            timeout: State::timeout(opts.timeout),
            live: watch::channel(true).0,
        };
        this.store.register_replica(&this.id, &this.name).await?;
        this.acks.set_replica(&this.name);
        tracing::info!("replica {} ({}) joined the store's replicas", this.name, this.id);
        Ok(this)
    }

    /// Whether this replica reached the database within the timeout: while
    /// false, it serves no xDS (see `state`).
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
        let mut state = State::new(self.timeout, Instant::now());
        let bound = self.timeout / 2;
        loop {
            tokio::select! {
                _ = local.changed() => {
                    let _ = tokio::time::timeout(bound, self.publish(&mut state)).await;
                }
                () = crate::store::notified(&mut remote) => {
                    let _ = tokio::time::timeout(bound, self.refresh(&state)).await;
                }
                _ = tick.tick() => {
                    if tokio::time::timeout(bound, self.heartbeat(&mut state)).await.is_err() {
                        let e = StoreError::Unavailable(Cause::NoAnswer { to: "a heartbeat", within: bound });
                        self.heartbeat_failed(&mut state, &e);
                    }
                    self.check_liveness(&state);
                    if !state.answering() {
                        // Unreachable: the next heartbeat tries again.
                        continue;
                    }
                    if state.must_rewrite() {
                        let _ = tokio::time::timeout(bound, self.publish(&mut state)).await;
                    }
                    let _ = tokio::time::timeout(bound, self.refresh(&state)).await;
                }
                stop = shutdown.changed() => if stop.is_err() || *shutdown.borrow() { break },
            }
        }
        if let Err(e) = self.store.leave_replicas(&self.id).await {
            tracing::warn!(
                "replica {}: could not leave the replicas table (others drop it after the timeout): {e}",
                self.name
            );
        } else {
            tracing::info!("replica {} left the store's replicas", self.name);
        }
    }

    fn check_liveness(&self, state: &State) {
        let live = state.live(Instant::now());
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

    fn heartbeat_failed(&self, state: &mut State, e: &StoreError) {
        if state.on_heartbeat(Beat::Failed, Instant::now()) == Action::Lost {
            tracing::warn!(
                "replica {}: heartbeat failed (the Envoys keep their configuration): {e}",
                self.name
            );
        }
    }

    async fn heartbeat(&self, state: &mut State) {
        let beat = match self.store.heartbeat(&self.id, state.forget_after()).await {
            Ok(Some(at)) => Beat::Stamped(at),
            Ok(None) => Beat::Forgotten,
            Err(e) => return self.heartbeat_failed(state, &e),
        };
        let mut action = state.on_heartbeat(beat, Instant::now());
        if action == Action::Register {
            // Forgotten by the others (silent for a minute): back in.
            if let Err(e) = self.store.register_replica(&self.id, &self.name).await {
                tracing::warn!("replica {}: cannot register again: {e}", self.name);
                return;
            }
            action = state.on_registered(Instant::now());
        }
        if action == Action::Back {
            tracing::info!("replica {}: the database answers again", self.name);
        }
    }

    /// Writes the streams that changed since the last write.
    async fn publish(&self, state: &mut State) {
        let current = streams::local(&self.acks);
        let Some(write) = state.to_write(&current) else {
            return;
        };
        match self.store.write_streams(&self.id, &write).await {
            Ok(()) => state.on_written(current),
            Err(e) => {
                tracing::debug!(
                    "replica {}: could not share its Envoy streams (retrying): {e}",
                    self.name
                );
                state.on_write_failed();
            }
        }
    }

    /// Reads every replica and the other replicas' streams into the tracker.
    async fn refresh(&self, state: &State) {
        let rows = match self.store.read_replicas().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!("replica {}: could not read the other replicas: {e}", self.name);
                return;
            }
        };
        let remote = streams::remote(rows, &self.id, |replica, this| state.counts(replica, this));
        self.acks.set_remote(remote.streams, remote.vms, remote.replicas);
    }
}
