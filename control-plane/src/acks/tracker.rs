//! The [`Tracker`]: one per control plane, shared by every xDS stream, the
//! file writer, the writes that wait and the status endpoint. Here, what
//! the Envoy (ECDS) streams and the ECDS file tell it.

use super::state::{File, Inner, Stream, StreamId, SETTLE};
use super::status::{time, Outcome, VersionEvent};
use crate::clock;
use crate::config::Version;
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const HISTORY: usize = 16;
pub(super) const MAX_DISCONNECTED: usize = 256;

/// Shared by every xDS stream, the file writer, the writes that wait, and
/// the status endpoint.
pub struct Tracker {
    /// How long a stream may leave a response unanswered before writes stop
    /// waiting for it (`--apply-timeout-ms`).
    pub(super) patience: Duration,
    pub(super) inner: Mutex<Inner>,
    pub(super) changed: watch::Sender<u64>,
    /// Changes of this replica's own streams only (what it shares).
    pub(super) local_changed: watch::Sender<u64>,
    /// VM streams connected or gone, a VM awaiting a snapshot.
    pub(super) vms_changed: watch::Sender<u64>,
}

/// The patience of [`Tracker::new`]: the default apply timeout.
const PATIENCE: Duration = Duration::from_secs(5);

impl Default for Tracker {
    fn default() -> Self {
        Self {
            patience: PATIENCE,
            inner: Mutex::new(Inner {
                settle: SETTLE,
                ..Inner::default()
            }),
            changed: watch::channel(0).0,
            local_changed: watch::channel(0).0,
            vms_changed: watch::channel(0).0,
        }
    }
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker whose writes stop waiting for a stream that left a response
    /// unanswered for `patience`.
    pub fn with_patience(patience: Duration) -> Self {
        Self {
            patience,
            ..Self::default()
        }
    }

    /// How long a node stays on the ECDS rule after one of its VMs subscribes
    /// ([`vms::SETTLE`] unless told).
    pub fn with_settle(self, settle: Duration) -> Self {
        self.lock().settle = settle;
        self
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // The data is plain bookkeeping: recover it even after a panic.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn update<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let out = f(&mut self.lock());
        self.local_changed.send_modify(|n| *n = n.wrapping_add(1));
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        out
    }

    /// [`Tracker::update`] of the VM streams' set.
    pub(super) fn update_vms<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let out = self.update(f);
        self.vms_changed.send_modify(|n| *n = n.wrapping_add(1));
        out
    }

    /// Resolves at the next change (ACK, NACK, connect, ...).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A stream's first request named its node.
    pub fn connected(&self, node: &str, cluster: &str, peer: &str, initial_version: &str) -> StreamId {
        self.update(|inner| {
            inner.next_id += 1;
            let id = StreamId(inner.next_id);
            inner.streams.insert(
                id,
                Stream {
                    node: node.to_owned(),
                    cluster: cluster.to_owned(),
                    peer: peer.to_owned(),
                    connected_at: clock::now(),
                    disconnected_at: None,
                    initial_version: initial_version.to_owned(),
                    held: None,
                    sent: None,
                    unanswered_since: None,
                    acked: None,
                    nacked: None,
                    history: VecDeque::new(),
                },
            );
            id
        })
    }

    /// The stream is held: Envoy enforces `reported`, newer than this
    /// control plane's version.
    pub fn held(&self, id: StreamId, reported: Version) {
        self.update(|inner| {
            if let Some(s) = inner.streams.get_mut(&id) {
                s.held = Some(reported);
            }
        });
    }

    pub fn released(&self, id: StreamId) {
        self.update(|inner| {
            if let Some(s) = inner.streams.get_mut(&id) {
                s.held = None;
            }
        });
    }

    pub fn sent(&self, id: StreamId, version: Version) {
        self.update(|inner| {
            if let Some(s) = inner.streams.get_mut(&id) {
                s.sent = Some(version);
                s.unanswered_since.get_or_insert_with(Instant::now);
            }
        });
    }

    fn record(&self, id: StreamId, version: Version, error: Option<&str>) {
        self.update(|inner| {
            if let Some(s) = inner.streams.get_mut(&id) {
                s.unanswered_since = None;
                match error {
                    None => s.acked = Some(s.acked.map_or(version, |a| a.max(version))),
                    Some(e) => s.nacked = Some((version, e.to_owned())),
                }
                s.history.push_front(VersionEvent {
                    version: version.to_string(),
                    outcome: if error.is_some() { Outcome::Nack } else { Outcome::Ack },
                    error: error.map(str::to_owned),
                    time: time(clock::now()),
                });
                s.history.truncate(HISTORY);
            }
        });
    }

    /// Envoy applied the version this stream sent with the nonce it answered.
    pub fn acked(&self, id: StreamId, version: Version) {
        self.record(id, version, None);
    }

    pub fn nacked(&self, id: StreamId, version: Version, error: &str) {
        self.record(id, version, Some(error));
    }

    pub fn disconnected(&self, id: StreamId) {
        self.update(|inner| {
            if let Some(mut s) = inner.streams.remove(&id) {
                s.disconnected_at = Some(clock::now());
                inner.disconnected.push_front((id, s));
                inner.disconnected.truncate(MAX_DISCONNECTED);
            }
        });
    }

    pub fn file_written(&self, path: &str, result: Result<Version, &std::io::Error>) {
        self.update(|inner| {
            let f = inner.file.get_or_insert_with(File::default);
            f.path = path.to_owned();
            match result {
                Ok(version) => {
                    f.written = Some(version);
                    f.written_at = Some(clock::now());
                    f.error = None;
                }
                Err(e) => f.error = Some(e.to_string()),
            }
        });
    }
}
